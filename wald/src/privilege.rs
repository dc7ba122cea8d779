//! Privilege handling: dropping root after the socket and directory are
//! open, refusing to keep running as root, and checking peer credentials.

use std::path::Path;

use anyhow::{bail, Context};
use nix::unistd::{Gid, Group, Uid, User};

/// The target identity of `--user`/`--group`.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `--user`/`--group` names (or numeric ids).
pub fn resolve(user: &str, group: Option<&str>) -> anyhow::Result<Identity> {
    let user_entry = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid))?,
        Err(_) => User::from_name(user)?,
    }
    .with_context(|| format!("user {user} does not exist"))?;
    let gid = match group {
        None => user_entry.gid,
        Some(name) => match name.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => {
                Group::from_name(name)?
                    .with_context(|| format!("group {name} does not exist"))?
                    .gid
            }
        },
    };
    Ok(Identity {
        uid: user_entry.uid,
        gid,
    })
}

/// Gives `path` (and the files directly inside it) to `identity`.
pub fn chown_tree(path: &Path, identity: Identity) -> anyhow::Result<()> {
    let chown = |p: &Path| {
        nix::unistd::chown(p, Some(identity.uid), Some(identity.gid))
            .with_context(|| format!("chown {}", p.display()))
    };
    chown(path)?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown(&entry?.path())?;
        }
    }
    Ok(())
}

/// Switches to `identity` for good and verifies that root cannot be regained.
pub fn drop_to(identity: Identity) -> anyhow::Result<()> {
    nix::unistd::setgroups(&[identity.gid]).context("setgroups")?;
    nix::unistd::setgid(identity.gid).context("setgid")?;
    nix::unistd::setuid(identity.uid).context("setuid")?;
    let (uid, euid) = (nix::unistd::getuid(), nix::unistd::geteuid());
    if uid != identity.uid || euid != identity.uid {
        bail!(
            "privilege drop did not stick: uid {uid}, euid {euid}, wanted {}",
            identity.uid
        );
    }
    if nix::unistd::getgid() != identity.gid || nix::unistd::getegid() != identity.gid {
        bail!("privilege drop did not stick for the group");
    }
    if !identity.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("privilege drop failed: could regain root");
    }
    tracing::info!(
        uid = identity.uid.as_raw(),
        gid = identity.gid.as_raw(),
        "dropped privileges"
    );
    Ok(())
}

/// Refuses to keep running as root unless allowed.
pub fn check_not_root(allow_root: bool) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() && !allow_root {
        bail!("refusing to run as root: pass --user to drop privileges, or --allow-root");
    }
    Ok(())
}

/// Which peers may use the socket.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// `uids = None` means the default: our own uid and root.
    pub fn new(uids: Option<Vec<u32>>, gids: Vec<u32>) -> Self {
        let uids = uids.unwrap_or_else(|| vec![nix::unistd::getuid().as_raw(), 0]);
        PeerPolicy { uids, gids }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}
