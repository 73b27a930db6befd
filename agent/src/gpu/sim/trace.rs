//! Replaying power traces recorded with `nvidia-smi`, so that operators can test a policy
//! against what their own machines did:
//!
//! ```text
//! nvidia-smi --query-gpu=timestamp,index,power.draw,utilization.gpu,memory.used \
//!            --format=csv -lms 100 > trace.csv
//! ```
//!
//! Columns are found by their header, so other columns and another order are fine;
//! `timestamp`, `index` and `power.draw` are required. A value of `[N/A]` or
//! `[Not Supported]` keeps the GPU's previous value. The trace loops when it ends.

use std::path::Path;

/// One sample of one GPU in a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TracePoint {
    /// Seconds since the trace's first sample.
    pub t_s: f64,
    pub power_w: f32,
    pub util_pct: f32,
    pub mem_used_mib: u32,
}

/// A parsed trace: for each GPU index, its samples in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    gpus: Vec<Vec<TracePoint>>,
    duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {error}")]
    Io { path: String, error: String },
    #[error(
        "trace has no `{0}` column; record it with `nvidia-smi --query-gpu=timestamp,index,power.draw,utilization.gpu,memory.used --format=csv -lms 100`"
    )]
    MissingColumn(&'static str),
    #[error("trace line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("trace has fewer than two samples for GPU {0}; a trace needs at least two per GPU")]
    TooShort(usize),
    #[error("trace is empty")]
    Empty,
}

impl Trace {
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|e| TraceError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Trace::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or(TraceError::Empty)?;
        let cols: Vec<String> = header.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
        let find = |name: &'static str| {
            cols.iter().position(|c| c == name || c.starts_with(&format!("{name} ")))
        };
        let c_ts = find("timestamp").ok_or(TraceError::MissingColumn("timestamp"))?;
        let c_idx = find("index").ok_or(TraceError::MissingColumn("index"))?;
        let c_pow = find("power.draw").ok_or(TraceError::MissingColumn("power.draw"))?;
        let c_util = find("utilization.gpu");
        let c_mem = find("memory.used");

        let mut gpus: Vec<Vec<TracePoint>> = Vec::new();
        let mut t0: Option<f64> = None;
        for (n, line) in lines {
            let lineno = n + 1;
            let err = |message: String| TraceError::Line { line: lineno, message };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() < cols.len() {
                return Err(err(format!("{} fields, the header has {}", fields.len(), cols.len())));
            }
            let ts = parse_timestamp(fields[c_ts]).ok_or_else(|| {
                err(format!("bad timestamp {:?}; expected YYYY/MM/DD HH:MM:SS.mmm", fields[c_ts]))
            })?;
            let idx: usize = fields[c_idx]
                .parse()
                .ok()
                .filter(|i| *i < 1024)
                .ok_or_else(|| err(format!("bad GPU index {:?}", fields[c_idx])))?;
            let t = ts - *t0.get_or_insert(ts);
            if gpus.len() <= idx {
                gpus.resize_with(idx + 1, Vec::new);
            }
            let prev = gpus[idx].last().copied();
            let num = |col: Option<usize>, unit: &str, fallback: f32| -> Result<f32, TraceError> {
                let Some(col) = col else { return Ok(fallback) };
                let v = fields[col];
                if v.starts_with('[') {
                    return Ok(fallback); // [N/A], [Not Supported]: hold the previous value
                }
                v.trim_end_matches(unit)
                    .trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| err(format!("bad value {v:?} in column {:?}", cols[col])))
            };
            let point = TracePoint {
                t_s: t.max(prev.map_or(0.0, |p| p.t_s)),
                power_w: num(Some(c_pow), "W", prev.map_or(0.0, |p| p.power_w))?,
                util_pct: num(c_util, "%", prev.map_or(0.0, |p| p.util_pct))?,
                mem_used_mib: num(c_mem, "MiB", prev.map_or(0.0, |p| p.mem_used_mib as f32))?
                    as u32,
            };
            gpus[idx].push(point);
        }
        if gpus.is_empty() {
            return Err(TraceError::Empty);
        }
        if let Some(i) = gpus.iter().position(|g| g.len() < 2) {
            return Err(TraceError::TooShort(i));
        }
        let duration_s = gpus.iter().filter_map(|g| g.last()).map(|p| p.t_s).fold(0.0, f64::max);
        Ok(Trace { gpus, duration_s })
    }

    /// How many GPUs the trace has.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    pub fn duration_s(&self) -> f64 {
        self.duration_s
    }

    /// The sample of `gpu` in force at `t_s` (the trace loops). `cursor` is the caller's
    /// position, so that replaying forward in time costs O(1) per call.
    pub fn at(&self, gpu: usize, t_s: f64, cursor: &mut usize) -> TracePoint {
        let points = &self.gpus[gpu % self.gpus.len()];
        let t = if self.duration_s > 0.0 { t_s % self.duration_s } else { 0.0 };
        if *cursor >= points.len() || points[*cursor].t_s > t {
            *cursor = 0; // looped
        }
        while *cursor + 1 < points.len() && points[*cursor + 1].t_s <= t {
            *cursor += 1;
        }
        points[*cursor]
    }
}

/// `2025/07/27 00:34:45.155` as seconds since the Unix epoch (UTC; only differences matter).
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split(['/', '-']).map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(y, m, day) as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "timestamp, index, power.draw [W], utilization.gpu [%], memory.used [MiB]
2025/07/27 00:34:45.155, 0, 72.36 W, 0 %, 131 MiB
2025/07/27 00:34:45.160, 1, 72.79 W, 0 %, 17 MiB
2025/07/27 00:34:45.285, 0, 300.0 W, 90 %, 108 MiB
2025/07/27 00:34:45.286, 1, [N/A], 50 %, 17 MiB
2025/07/27 00:34:45.385, 0, 500.0 W, 100 %, 108 MiB
2025/07/27 00:34:45.386, 1, 80.0 W, 50 %, 17 MiB
";

    #[test]
    fn parses_nvidia_smi_csv_and_holds_na_values() {
        let t = Trace::parse(SMALL).unwrap();
        assert_eq!(t.gpu_count(), 2);
        let mut c = 0;
        assert_eq!(t.at(0, 0.0, &mut c).power_w, 72.36);
        assert_eq!(t.at(0, 0.14, &mut c).power_w, 300.0);
        let mut c1 = 0;
        assert_eq!(t.at(1, 0.14, &mut c1).power_w, 72.79, "[N/A] holds the previous value");
        assert_eq!(t.at(1, 0.14, &mut c1).util_pct, 50.0);
    }

    #[test]
    fn loops_at_the_end() {
        let t = Trace::parse(SMALL).unwrap();
        let mut c = 0;
        let d = t.duration_s();
        assert_eq!(t.at(0, d - 0.001, &mut c).power_w, 300.0);
        assert_eq!(t.at(0, d + 0.001, &mut c).power_w, 72.36);
    }

    #[test]
    fn bad_traces_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("", "trace is empty"),
            ("timestamp, power.draw [W]\n", "trace has no `index` column"),
            (
                "timestamp, index, power.draw [W]\n2025/07/27 00:00:00.0, 0, lots W\n",
                "trace line 2: bad value \"lots W\"",
            ),
            (
                "timestamp, index, power.draw [W]\nyesterday, 0, 1 W\n",
                "trace line 2: bad timestamp",
            ),
            (
                "timestamp, index, power.draw [W]\n2025/07/27 00:00:00.0, 0, 1 W\n",
                "fewer than two samples for GPU 0",
            ),
        ];
        for (input, want) in cases {
            let got = Trace::parse(input).unwrap_err().to_string();
            assert!(got.contains(want), "input {input:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn the_shipped_h100_trace_parses() {
        let t = Trace::parse(super::super::H100_TRAINING_TRACE).unwrap();
        assert_eq!(t.gpu_count(), 8);
        assert!(t.duration_s() > 600.0 && t.duration_s() < 720.0, "{}", t.duration_s());
    }
}
