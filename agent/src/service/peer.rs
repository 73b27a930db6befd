//! Who is on the other end of the socket: the kernel's peer credentials (`SO_PEERCRED`,
//! which the caller cannot forge) and the groups the caller's user is in.

/// A group's id by name, from the system's group database (NSS).
pub fn group_id(name: &str) -> Result<u32, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("there is no group {name:?} on this machine")),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

/// Whether user `uid` (whose process has primary group `gid`) is in group `group`: its
/// primary group, or a supplementary group of the user in the group database (NSS:
/// `/etc/group`, LDAP, sssd). Read from the user, not the caller's process: under the
/// unit's `ProtectProc=invisible` other users' `/proc/<pid>` cannot be read, and a pid may
/// be reused.
pub fn in_group(uid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else { return false };
    let Ok(name) = std::ffi::CString::new(user.name) else { return false };
    getgrouplist(&name, user.gid).is_ok_and(|groups| groups.contains(&Gid::from_raw(group)))
}
