//! The terminal view of a [`Fleet`]: the totals, a table of nodes sorted by the chosen
//! key (as many as fit), and the latest notable events. Drawn with ratatui.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};

use super::{Fleet, SortKey};

/// What the view shows beside the fleet: the broker and whether it is connected.
#[derive(Debug, Clone)]
pub struct Header {
    pub broker: String,
    pub connected: bool,
    pub error: Option<String>,
    pub sort: SortKey,
    pub now_ms: u64,
}

pub fn draw(f: &mut Frame<'_>, fleet: &Fleet, h: &Header) {
    let s = fleet.summary();
    // The title, the totals, the broker, the rule.
    let [top, table, events] =
        Layout::vertical([Constraint::Length(4), Constraint::Min(5), Constraint::Length(8)])
            .areas(f.area());

    let link = if h.connected {
        format!("{} connected", h.broker)
    } else {
        format!("{} NOT connected: {}", h.broker, h.error.as_deref().unwrap_or("connecting"))
    };
    let summary = Line::from(format!("{s} · sorted by {} (s: next, q: quit)", h.sort.name()));
    f.render_widget(
        Paragraph::new(vec![summary, Line::from(link)])
            .block(Block::default().borders(Borders::BOTTOM).title(" gpulet top ")),
        top,
    );

    let rows: Vec<Row<'_>> = fleet
        .rows(h.sort)
        .into_iter()
        .take(table.height.saturating_sub(1) as usize)
        .map(|r| {
            let state = match r.online {
                Some(true) => "online",
                Some(false) => "OFFLINE",
                None => "?",
            };
            let age = r.last_ts_ms.map_or("-".into(), |t| {
                format!("{:.0}s", h.now_ms.saturating_sub(t) as f64 / 1000.0)
            });
            let style = if r.online == Some(false) || !r.unhealthy.is_empty() {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            Row::new(vec![
                r.node.clone(),
                state.to_owned(),
                r.power_w.map_or("-".into(), |p| format!("{p:.0} W")),
                r.budget_w.map_or("-".into(), |b| format!("{b:.0} W")),
                r.budget_share().map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                r.hottest.map_or("-".into(), |(g, c)| format!("{c:.0} °C (GPU {g})")),
                if r.unhealthy.is_empty() {
                    "-".into()
                } else {
                    r.unhealthy
                        .iter()
                        .map(|(g, h)| format!("{g}:{h}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                r.plugin_faults.to_string(),
                age,
            ])
            .style(style)
        })
        .collect();
    let header = Row::new([
        "NODE",
        "STATE",
        "POWER",
        "BUDGET",
        "USE",
        "HOTTEST",
        "UNHEALTHY",
        "FAULTS",
        "AGE",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Min(14),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(16),
        Constraint::Min(10),
        Constraint::Length(7),
        Constraint::Length(5),
    ];
    f.render_widget(Table::new(rows, widths).header(header), table);

    let lines: Vec<Line<'_>> = fleet
        .events()
        .rev()
        .take(events.height.saturating_sub(1) as usize)
        .map(|e| Line::from(format!("{} {} {}", e.node, e.kind, e.detail)))
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(
            Block::default().borders(Borders::TOP).title(format!(
                " events (newest first; {} limit changes counted) ",
                s.limit_changes
            )),
        ),
        events,
    );
}
