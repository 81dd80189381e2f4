//! Unix sockets that other users may connect to: the vhost-user socket of a QEMU that runs as
//! another user (libvirt's `libvirt-qemu`) and the QMP socket (`--socket-mode`,
//! `--socket-group`, `--qmp-mode`, `--qmp-group`).
//!
//! The socket is bound under a temporary name, given its mode and group, then renamed into
//! place, so that it is never reachable at its path with other permissions than asked for
//! (a `chmod` after `bind` would leave it, for a moment, as the umask made it).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Who may connect: the socket's permission bits and group (`None`: as created, i.e. the
/// umask's bits and the process's group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub mode: Option<u32>,
    pub group: Option<u32>,
}

/// Binds `path` with `access`: a stale socket there is removed first; any other kind of
/// existing file is an `AlreadyExists` error.
pub fn bind(path: &Path, access: Access) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = set_access(&tmp, access).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

fn set_access(path: &Path, access: Access) -> io::Result<()> {
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot give the socket to group {gid}: {e} (colo-blk must run as root or \
                     as a member of that group)"
                ),
            )
        })?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The id of group `name` (a name from the group database, or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname =
        std::ffi::CString::new(name).map_err(|_| format!("'{name}' is not a group name"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: an all-zero `group` is valid (null pointers, zero id) for getgrnam_r to fill.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `grp` and
        // `found` are live locals, `buf` is writable for `buf.len()` bytes.
        let r = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match r {
            libc::ERANGE if buf.len() < (1 << 20) => buf.resize(buf.len() * 2, 0),
            0 if !found.is_null() => return Ok(grp.gr_gid),
            0 => return Err(format!("no group named '{name}'")),
            e => {
                return Err(format!(
                    "looking up group '{name}': {}",
                    io::Error::from_raw_os_error(e)
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_socket_gets_its_mode_and_group_and_replaces_only_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // SAFETY: getegid(2) has no preconditions.
        let gid = unsafe { libc::getegid() };
        let access = Access {
            mode: Some(0o660),
            group: Some(gid),
        };
        let l = bind(&path, access).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o777, 0o660);
        assert_eq!(md.gid(), gid);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(l);
        // A stale socket is replaced; a regular file is not.
        bind(&path, Access::default()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let e = bind(&path, access).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-colo")
            .unwrap_err()
            .contains("no group named"));
    }
}
