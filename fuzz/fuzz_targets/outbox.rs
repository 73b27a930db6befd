//! The outbox reader on any bytes left on disk (a torn or corrupt segment, a damaged
//! state slot): opening never panics and never fails on content, and every record it
//! then calls pending reads back or is reported unreadable, never garbage.
#![no_main]

use gpulet::mqtt::outbox::{Outbox, OutboxConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes split the rest into a segment and a state slot.
    let Some((split, rest)) = data.split_first_chunk::<2>() else { return };
    let at = usize::from(u16::from_le_bytes(*split)).min(rest.len());
    let (segment, slot) = rest.split_at(at);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00000000000000000000.seg"), segment).unwrap();
    std::fs::write(dir.path().join("state.a"), slot).unwrap();
    let cfg = OutboxConfig {
        dir: dir.path().to_path_buf(),
        max_bytes: 1 << 20,
        max_age_ms: u64::MAX >> 1,
        segment_bytes: 1 << 16,
        fsync: false,
    };
    let mut o = Outbox::open(cfg).expect("content never stops the outbox from opening");
    for seq in o.pending(0, u64::MAX, 10_000) {
        if let Ok(Some(m)) = o.read(seq) {
            assert!(m.topic.len() <= 65_535);
        }
        o.commit(seq);
    }
});
