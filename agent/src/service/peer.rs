//! Who is on the other end of the socket: the kernel's peer credentials (`SO_PEERCRED`,
//! which the caller cannot forge) and the groups the caller's process is in.

/// A group's id by name, from the system's group database (NSS).
pub fn group_id(name: &str) -> Result<u32, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("there is no group {name:?} on this machine")),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

/// Whether the process `pid` (with primary group `gid`) is in group `group`: its primary
/// group or one of its supplementary groups (`/proc/<pid>/status`, read while the caller
/// is connected).
pub fn in_group(pid: Option<i32>, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let Some(pid) = pid else { return false };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(group)))
}
