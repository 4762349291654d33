//! Which program an `exec` command runs, and whether this node lets it run: a name is looked
//! up as `execvp(3)` does, but in the workload's own `PATH` (never the node's); with
//! `--exec-allow` the program must match one of the node's patterns.
//!
//! A pattern is an absolute path: `/usr/bin/sleep` allows exactly that program, `/opt/app/*`
//! the programs directly in `/opt/app` (not those in its subdirectories: list them too). The
//! program and the patterns are compared by their real location: the directory with symbolic
//! links and `..` resolved, the file name as given. So `/bin/sh` and `/usr/bin/sh` are one
//! program on a merged-`/usr` system, and `/opt/app/../../tmp/x` is `/tmp/x`. A link as the
//! last component is not followed (`/usr/bin/java` may point into `/etc/alternatives`): allow
//! the name the specs use. The node executes the program at that real location, so what it
//! checked is what runs. Allow only directories that workloads cannot write to.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

/// The `PATH` of every exec workload whose config's `env` sets none.
pub(crate) const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program `command` names, as an absolute path: a command with a `/` is a path (relative
/// to `cwd`, the process's working directory); a name is the first executable file of that
/// name in the directories of `path` (the process's `PATH`; relative entries, and empty ones,
/// are relative to `cwd`, as for `execvp`).
pub(crate) fn locate(command: &str, path: &str, cwd: &Path) -> Result<PathBuf, String> {
    if command.contains('/') {
        return Ok(cwd.join(command));
    }
    path.split(':')
        .map(|dir| cwd.join(dir).join(command))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            format!(
                "`{command}` is not in the workload's PATH ({path}): workloads do not inherit the node's PATH; give the program's absolute path, or set PATH in the exec config's `env`"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where `program` (an absolute path) really is: its directory with symbolic links and `..`
/// resolved, its file name kept (see the module docs).
pub(crate) fn real_location(program: &Path) -> std::io::Result<PathBuf> {
    match (program.parent(), program.file_name()) {
        (Some(dir), Some(name)) => Ok(std::fs::canonicalize(dir)?.join(name)),
        _ => Ok(program.to_path_buf()),
    }
}

/// A node's `--exec-allow` patterns (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllowList {
    patterns: Vec<Pattern>,
    /// As given, for messages.
    given: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Exactly this program (its real location).
    Program(PathBuf),
    /// The programs directly in this directory (its real location).
    Directory(PathBuf),
}

impl Pattern {
    /// Check one pattern's form (no file system access).
    fn parse(text: &str) -> Result<Pattern, String> {
        let what = "patterns are absolute paths: /usr/bin/sleep allows that program, /opt/app/* the programs directly in /opt/app";
        if !text.starts_with('/') {
            return Err(format!(
                "--exec-allow `{text}` is not an absolute path ({what})"
            ));
        }
        let (path, directory) = match text.strip_suffix("/*") {
            Some(dir) => (if dir.is_empty() { "/" } else { dir }, true),
            None => (text, false),
        };
        if path.contains(['*', '?', '[']) {
            return Err(format!(
                "--exec-allow `{text}`: the only wildcard is a trailing `/*` ({what})"
            ));
        }
        if Path::new(path)
            .components()
            .any(|c| c == Component::ParentDir)
        {
            return Err(format!(
                "--exec-allow `{text}` contains `..`: name the directory itself ({what})"
            ));
        }
        if !directory && text.ends_with('/') {
            return Err(format!(
                "--exec-allow `{text}` names a directory: write `{text}*` to allow the programs in it"
            ));
        }
        let path = PathBuf::from(path);
        Ok(if directory {
            Pattern::Directory(path)
        } else {
            Pattern::Program(path)
        })
    }

    /// Resolve its real location now; one whose directory does not exist (yet) stays as
    /// written.
    fn resolved(self) -> Pattern {
        match self {
            Pattern::Program(p) => Pattern::Program(real_location(&p).unwrap_or(p)),
            Pattern::Directory(d) => Pattern::Directory(std::fs::canonicalize(&d).unwrap_or(d)),
        }
    }

    fn matches(&self, program: &Path) -> bool {
        match self {
            Pattern::Program(p) => program == p,
            Pattern::Directory(d) => {
                program.file_name().is_some() && program.parent() == Some(d.as_path())
            }
        }
    }
}

/// Check the form of one `--exec-allow` pattern (for the flag's parser).
pub(crate) fn check_pattern(text: &str) -> Result<String, String> {
    Pattern::parse(text).map(|_| text.to_string())
}

impl AllowList {
    /// The patterns, their real locations resolved now (at the node's start).
    pub(crate) fn new(patterns: &[String]) -> Result<AllowList, String> {
        let parsed = patterns
            .iter()
            .map(|p| Pattern::parse(p).map(Pattern::resolved))
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err(
                "--exec-allow needs at least one pattern (to turn exec off, use --no-exec)".into(),
            );
        }
        Ok(AllowList {
            patterns: parsed,
            given: patterns.to_vec(),
        })
    }

    /// Whether `program` (its real location) matches a pattern.
    pub(crate) fn permits(&self, program: &Path) -> bool {
        self.patterns.iter().any(|p| p.matches(program))
    }

    /// The patterns as given: `/usr/bin/sleep, /opt/app/*`.
    pub(crate) fn describe(&self) -> String {
        self.given.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("mode-program-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(std::fs::canonicalize(&dir).unwrap())
        }

        fn program(&self, relative: &str, mode: u32) -> PathBuf {
            let path = self.0.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn allow(patterns: &[&str]) -> AllowList {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        AllowList::new(&patterns).unwrap()
    }

    #[test]
    fn names_are_found_in_the_given_path_only() {
        let s = Scratch::new("locate");
        let tool = s.program("b/tool", 0o755);
        s.program("a/tool", 0o644);
        let path = format!("{0}/a:{0}/b", s.0.display());
        assert_eq!(locate("tool", &path, Path::new("/")).unwrap(), tool);
        // Relative entries are relative to the working directory; so are relative commands.
        assert_eq!(locate("tool", "a:b", &s.0).unwrap(), s.0.join("b/tool"));
        assert_eq!(locate("./b/tool", "", &s.0).unwrap(), s.0.join("./b/tool"));
        assert_eq!(locate("/bin/x", "", &s.0).unwrap(), PathBuf::from("/bin/x"));
        let e = locate("tool", "/nonexistent", &s.0).unwrap_err();
        assert!(
            e.contains("`tool` is not in the workload's PATH (/nonexistent)")
                && e.contains("do not inherit the node's PATH"),
            "{e}"
        );
    }

    #[test]
    fn patterns_are_absolute_paths_with_at_most_a_trailing_star() {
        assert_eq!(
            Pattern::parse("/usr/bin/sleep"),
            Ok(Pattern::Program("/usr/bin/sleep".into()))
        );
        assert_eq!(
            Pattern::parse("/opt/app/*"),
            Ok(Pattern::Directory("/opt/app".into()))
        );
        assert_eq!(Pattern::parse("/*"), Ok(Pattern::Directory("/".into())));
        for (bad, why) in [
            ("sleep", "not an absolute path"),
            ("/opt/*/bin/*", "only wildcard"),
            ("/usr/bin/python3.?", "only wildcard"),
            ("/opt/app/../../bin/*", "contains `..`"),
            ("/opt/app/", "names a directory"),
        ] {
            let e = Pattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(AllowList::new(&[]).unwrap_err().contains("--no-exec"));
    }

    #[test]
    fn a_program_matches_its_path_or_its_directory() {
        let list = allow(&["/nonexistent/bin/sleep", "/nonexistent/app/*"]);
        assert!(list.permits(Path::new("/nonexistent/bin/sleep")));
        assert!(!list.permits(Path::new("/nonexistent/bin/sleeper")));
        assert!(!list.permits(Path::new("/nonexistent/bin/sh")));
        assert!(list.permits(Path::new("/nonexistent/app/run")));
        // Directly in the directory: not below it, not the directory itself.
        assert!(!list.permits(Path::new("/nonexistent/app/bin/run")));
        assert!(!list.permits(Path::new("/nonexistent/app")));
        assert!(!list.permits(Path::new("/nonexistent/application")));
        assert_eq!(
            list.describe(),
            "/nonexistent/bin/sleep, /nonexistent/app/*"
        );
    }

    #[test]
    fn links_and_dots_in_the_directory_are_resolved_on_both_sides() {
        let s = Scratch::new("real");
        let tool = s.program("real/tool", 0o755);
        std::os::unix::fs::symlink(s.0.join("real"), s.0.join("link")).unwrap();
        std::os::unix::fs::symlink(&tool, s.0.join("real/alias")).unwrap();
        // A pattern through the link allows the program at its real place, and back.
        let list = allow(&[&format!("{}/link/tool", s.0.display())]);
        assert!(list.permits(&real_location(&tool).unwrap()));
        let through = s.0.join("link/../link/tool");
        assert_eq!(real_location(&through).unwrap(), tool);
        // `..` cannot climb out of an allowed directory.
        let dir = allow(&[&format!("{}/real/*", s.0.display())]);
        let escape = s.0.join("real/../outside");
        assert!(!dir.permits(&real_location(&escape).unwrap()));
        // The last component is not followed: an allowed name stays allowed.
        let alias = real_location(&s.0.join("link/alias")).unwrap();
        assert_eq!(alias, s.0.join("real/alias"));
        assert!(dir.permits(&alias));
    }
}
