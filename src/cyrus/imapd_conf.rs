//! `imapd.conf`, as Cyrus's `config_read_file` reads it: `key: value` lines, `#` comments,
//! blank lines and `@include: FILE`; keys are lower-cased, values trimmed, a later line for
//! the same key wins. The tools read it now (`mboxlist push`); the daemon will under cyrmaster.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why an imapd.conf could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Syntax {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

/// The options of one imapd.conf (with its includes).
#[derive(Debug, Default, Clone)]
pub struct ImapdConf {
    opts: HashMap<String, String>,
}

impl ImapdConf {
    pub fn read(path: &Path) -> Result<ImapdConf, ConfError> {
        let mut c = ImapdConf::default();
        c.read_into(path, 0)?;
        Ok(c)
    }

    fn read_into(&mut self, path: &Path, depth: u32) -> Result<(), ConfError> {
        let syntax = |line: usize, what: String| ConfError::Syntax {
            path: path.to_path_buf(),
            line,
            what,
        };
        if depth > 8 {
            return Err(syntax(0, "@include nested too deeply".into()));
        }
        let text = std::fs::read(path).map_err(|source| ConfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8_lossy(&text);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(syntax(i + 1, format!("not a `key: value` line: {line:?}")));
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim().to_string();
            if key == "@include" {
                self.read_into(Path::new(&value), depth + 1)?;
                continue;
            }
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(syntax(i + 1, format!("invalid option name {key:?}")));
            }
            self.opts.insert(key, value);
        }
        Ok(())
    }

    /// An option's value; an empty value counts as unset, as in Cyrus.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `servername`, defaulting to the host name as Cyrus does.
    pub fn servername(&self) -> String {
        self.get("servername").map_or_else(hostname, str::to_string)
    }
}

/// The host name (the kernel's `uname` node name), Cyrus's default `servername`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_cyrus() {
        let dir = tempfile::tempdir().unwrap();
        let inc = dir.path().join("inc.conf");
        std::fs::write(&inc, "servername: included\n").unwrap();
        let main = dir.path().join("imapd.conf");
        std::fs::write(
            &main,
            format!("# comment\n\nConfigDirectory:  /var/lib/cyrus \nservername: first\n@include: {}\nmupdate_password:\n", inc.display()),
        )
        .unwrap();
        let c = ImapdConf::read(&main).unwrap();
        assert_eq!(c.get("configdirectory"), Some("/var/lib/cyrus"));
        assert_eq!(c.servername(), "included");
        assert_eq!(c.get("mupdate_password"), None);
        std::fs::write(&main, "no colon here\n").unwrap();
        assert!(matches!(
            ImapdConf::read(&main),
            Err(ConfError::Syntax { line: 1, .. })
        ));
        assert!(!hostname().is_empty());
    }
}
