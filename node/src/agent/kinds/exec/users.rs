//! Who an `exec` process runs as: its config's `user` and `group` (names or numeric ids),
//! resolved on the node that starts it from `/etc/passwd` and `/etc/group`, and the switch to
//! those ids in the forked child, before it executes the program (see `spawner`).
//!
//! Only the two files are read, not NSS: accounts from LDAP, SSSD or systemd-homed are not
//! found by name there; give numeric ids for those.

use std::fmt;
use std::io;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A user or a group as a config names it: `nobody` or `65534` (a string of digits is an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Account {
    Id(u32),
    Name(String),
}

impl Account {
    /// `nobody` or `65534`, as a config says it.
    pub(crate) fn parse(text: &str) -> Result<Account, String> {
        if text.is_empty() {
            return Err("empty: give a name or a numeric id".into());
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return match text.parse::<u32>() {
                Ok(id) => Account::id(u64::from(id)),
                Err(_) => Err(format!(
                    "{text} is not a valid id (at most {})",
                    u32::MAX - 1
                )),
            };
        }
        if let Some(c) = text
            .chars()
            .find(|c| *c == ':' || *c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`{}` is not an account name (it contains {c:?})",
                text.escape_debug()
            ));
        }
        Ok(Account::Name(text.to_string()))
    }

    fn id(id: u64) -> Result<Account, String> {
        // (uid_t)-1 means "leave unchanged" to setuid and friends: never an account.
        match u32::try_from(id) {
            Ok(id) if id != u32::MAX => Ok(Account::Id(id)),
            _ => Err(format!("{id} is not a valid id (at most {})", u32::MAX - 1)),
        }
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Id(id) => write!(f, "{id}"),
            Account::Name(name) => f.write_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AccountVisitor;

        impl Visitor<'_> for AccountVisitor {
            type Value = Account;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name or a numeric id")
            }

            fn visit_u64<E: de::Error>(self, id: u64) -> Result<Account, E> {
                Account::id(id).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, id: i64) -> Result<Account, E> {
                match u64::try_from(id) {
                    Ok(id) => self.visit_u64(id),
                    Err(_) => Err(E::custom(format!(
                        "{id} is not a valid id (ids are not negative)"
                    ))),
                }
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Account, E> {
                Account::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(AccountVisitor)
    }
}

/// The ids a process is switched to before it executes its program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The supplementary groups (the primary group among them).
    pub(crate) groups: Vec<u32>,
}

impl Credentials {
    /// Take these ids, in the forked child before it executes: supplementary groups, group,
    /// then user (once the user is switched, nothing else may be). Only system calls, no
    /// allocation: safe between fork and exec.
    pub(crate) fn apply(&self) -> io::Result<()> {
        let groups: &[libc::gid_t] = &self.groups;
        // SAFETY: plain system calls; `groups` outlives the call.
        unsafe {
            if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The account a run uses: the ids to switch to (none when it runs as the node does) and the
/// home directory its `HOME` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) switch: Option<Credentials>,
    pub(crate) home: String,
}

/// `/etc/passwd` and `/etc/group`, as far as they are needed here.
#[derive(Debug, Default)]
pub(crate) struct AccountFiles {
    users: Vec<User>,
    groups: Vec<Group>,
}

#[derive(Debug)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

impl AccountFiles {
    /// Read this machine's files.
    pub(crate) fn read() -> Result<AccountFiles, String> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| {
                format!("cannot read {path} to look up the `user`/`group` of the exec config: {e}")
            })
        };
        Ok(AccountFiles::parse(&read(PASSWD)?, &read(GROUP)?))
    }

    /// The two files' text. Lines that are not entries (comments, NIS `+` lines) are skipped.
    pub(crate) fn parse(passwd: &str, group: &str) -> AccountFiles {
        let users = passwd
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                Some(User {
                    name: f.first()?.to_string(),
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                    home: f.get(5)?.to_string(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                Some(Group {
                    name: f.first()?.to_string(),
                    gid: f.get(2)?.parse().ok()?,
                    members: f
                        .get(3)?
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                })
            })
            .collect();
        AccountFiles { users, groups }
    }

    fn user(&self, account: &Account) -> Option<&User> {
        self.users.iter().find(|u| match account {
            Account::Id(id) => u.uid == *id,
            Account::Name(name) => u.name == *name,
        })
    }

    /// The ids and home of `user` (with `group` instead of its primary group). Without
    /// `group`, the process gets the user's primary group and every group `/etc/group` lists
    /// it in (as `login` and `initgroups(3)` do); with `group`, only that group.
    pub(crate) fn credentials(
        &self,
        user: &Account,
        group: Option<&Account>,
    ) -> Result<(Credentials, String), String> {
        let entry = self.user(user);
        let uid = match (user, entry) {
            (_, Some(u)) => u.uid,
            (Account::Id(id), None) => *id,
            (Account::Name(name), None) => {
                return Err(format!(
                    "user `{name}` is not in {PASSWD} on this node: create it, or give a numeric `user` (and `group`)"
                ))
            }
        };
        let (gid, groups) = match (group, entry) {
            (Some(group), _) => {
                let gid = self.group_id(group)?;
                (gid, vec![gid])
            }
            (None, Some(u)) => {
                let mut groups = vec![u.gid];
                for g in self.groups.iter().filter(|g| g.members.contains(&u.name)) {
                    if !groups.contains(&g.gid) {
                        groups.push(g.gid);
                    }
                }
                (u.gid, groups)
            }
            (None, None) => {
                return Err(format!(
                    "uid {uid} is not in {PASSWD} on this node, so it has no primary group: also give `group`"
                ))
            }
        };
        let home = entry
            .map(|u| u.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string());
        Ok((Credentials { uid, gid, groups }, home))
    }

    fn group_id(&self, group: &Account) -> Result<u32, String> {
        match group {
            Account::Id(id) => Ok(*id),
            Account::Name(name) => self
                .groups
                .iter()
                .find(|g| g.name == *name)
                .map(|g| g.gid)
                .ok_or_else(|| {
                    format!(
                        "group `{name}` is not in {GROUP} on this node: create it, or give a numeric `group`"
                    )
                }),
        }
    }

    /// The home directory `/etc/passwd` gives `uid`, else `/`.
    pub(crate) fn home_of(&self, uid: u32) -> String {
        self.user(&Account::Id(uid))
            .map(|u| u.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string())
    }
}

/// Whom a process of an exec config with `user` and `group` runs as, on this node (see
/// [`AccountFiles::credentials`] and [`switch_for`]); without `user`, as the node does, with
/// the node's user's home (`/` if `/etc/passwd` cannot tell).
pub(crate) fn run_as(user: Option<&Account>, group: Option<&Account>) -> Result<RunAs, String> {
    let ids = effective_ids();
    let Some(user) = user else {
        let home = AccountFiles::read().map_or_else(|_| "/".to_string(), |f| f.home_of(ids.0));
        return Ok(RunAs { switch: None, home });
    };
    let (credentials, home) = AccountFiles::read()?.credentials(user, group)?;
    let switch = switch_for(user, credentials, ids)?;
    Ok(RunAs { switch, home })
}

/// Whether a node running with effective ids `(euid, egid)` can start a process as
/// `credentials`: root can switch to any; any other user only "switches" to its own ids, which
/// needs no switch at all (`None`).
pub(crate) fn switch_for(
    user: &Account,
    credentials: Credentials,
    (euid, egid): (u32, u32),
) -> Result<Option<Credentials>, String> {
    if euid == 0 {
        return Ok(Some(credentials));
    }
    if credentials.uid == euid && credentials.gid == egid {
        return Ok(None);
    }
    Err(format!(
        "cannot run as user `{user}` (uid {}, gid {}): this node's mode-node runs as uid {euid}, not root, and only root can start a process as another user or group; run the node as root, or remove `user`/`group` from the exec config",
        credentials.uid, credentials.gid
    ))
}

/// This process's effective ids.
fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
+nis
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
app:x:1000:1000::/home/app:/bin/sh
nohome:x:1001:1001:::/bin/sh
";
    const GROUP_TEXT: &str = "\
root:x:0:
nogroup:x:65534:
app:x:1000:
docker:x:999:someone, app
video:x:44:app
empty:x:45:
";

    fn files() -> AccountFiles {
        AccountFiles::parse(PASSWD_TEXT, GROUP_TEXT)
    }

    fn name(n: &str) -> Account {
        Account::Name(n.into())
    }

    #[test]
    fn accounts_parse_as_names_or_ids() {
        assert_eq!(Account::parse("nobody"), Ok(name("nobody")));
        assert_eq!(Account::parse("65534"), Ok(Account::Id(65534)));
        assert_eq!(Account::parse("0"), Ok(Account::Id(0)));
        assert!(Account::parse("").unwrap_err().starts_with("empty"));
        assert!(Account::parse("4294967295")
            .unwrap_err()
            .contains("not a valid id"));
        assert!(Account::parse("99999999999")
            .unwrap_err()
            .contains("not a valid id"));
        assert!(Account::parse("a:b").unwrap_err().contains("':'"));
        assert!(Account::parse("a b")
            .unwrap_err()
            .contains("not an account name"));
        let from = |v: serde_json::Value| serde_json::from_value::<Account>(v);
        assert_eq!(from(serde_json::json!(65534)).unwrap(), Account::Id(65534));
        assert_eq!(from(serde_json::json!("app")).unwrap(), name("app"));
        assert!(from(serde_json::json!(-1))
            .unwrap_err()
            .to_string()
            .contains("not negative"));
        assert!(from(serde_json::json!(true))
            .unwrap_err()
            .to_string()
            .contains("a name or a numeric id"));
    }

    #[test]
    fn a_user_gets_its_primary_group_and_the_groups_listing_it() {
        let (c, home) = files().credentials(&name("app"), None).unwrap();
        assert_eq!(
            c,
            Credentials {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 999, 44]
            }
        );
        assert_eq!(home, "/home/app");
        // By id, the same entry.
        assert_eq!(files().credentials(&Account::Id(1000), None).unwrap().0, c);
        let (nobody, home) = files().credentials(&name("nobody"), None).unwrap();
        assert_eq!(
            (nobody.uid, nobody.gid, nobody.groups),
            (65534, 65534, vec![65534])
        );
        assert_eq!(home, "/nonexistent");
        assert_eq!(files().credentials(&name("nohome"), None).unwrap().1, "/");
    }

    #[test]
    fn a_group_given_replaces_every_group() {
        let (c, _) = files()
            .credentials(&name("app"), Some(&name("video")))
            .unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (1000, 44, vec![44]));
        let (c, home) = files()
            .credentials(&Account::Id(4242), Some(&Account::Id(4343)))
            .unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4242, 4343, vec![4343]));
        assert_eq!(home, "/");
    }

    #[test]
    fn unknown_accounts_say_what_to_do() {
        let e = files().credentials(&name("ghost"), None).unwrap_err();
        assert!(
            e.contains("user `ghost` is not in /etc/passwd") && e.contains("numeric"),
            "{e}"
        );
        let e = files().credentials(&Account::Id(4242), None).unwrap_err();
        assert!(
            e.contains("uid 4242") && e.contains("also give `group`"),
            "{e}"
        );
        let e = files()
            .credentials(&name("app"), Some(&name("wheel")))
            .unwrap_err();
        assert!(e.contains("group `wheel` is not in /etc/group"), "{e}");
    }

    #[test]
    fn only_root_switches_and_others_may_keep_their_own_ids() {
        let c = Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        assert_eq!(
            switch_for(&name("nobody"), c.clone(), (0, 0)),
            Ok(Some(c.clone()))
        );
        assert_eq!(
            switch_for(&name("nobody"), c.clone(), (65534, 65534)),
            Ok(None)
        );
        let e = switch_for(&name("nobody"), c, (1000, 1000)).unwrap_err();
        assert!(
            e.contains("cannot run as user `nobody` (uid 65534, gid 65534)")
                && e.contains("runs as uid 1000, not root"),
            "{e}"
        );
    }

    #[test]
    fn homes_come_from_the_passwd_file() {
        assert_eq!(files().home_of(0), "/root");
        assert_eq!(files().home_of(4242), "/");
    }
}
