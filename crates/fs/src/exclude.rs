//! `exclude` globs: paths served locally and never replicated.
//!
//! Syntax (matched against the path relative to the replicated directory, components separated
//! by `/`, no leading `/`):
//! - `*` matches any run of characters within one component, `?` one character,
//!   `[abc]`, `[a-z]`, `[!a-z]` one character of (or not of) a set;
//! - a `**` component matches zero or more components;
//! - a path is excluded when it, or any directory above it, matches a glob: `cache` excludes the
//!   directory `cache` and everything under it, `*.tmp` excludes `.tmp` names at the top level
//!   only, `**/*.tmp` at any depth.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::FsError;

/// A compiled set of `exclude` globs.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    patterns: Vec<Vec<Vec<u8>>>,
}

impl Exclusions {
    /// Compiles globs; refuses an empty glob, `.`/`..` components and unbalanced `[`.
    pub fn new<S: AsRef<str>>(globs: &[S]) -> Result<Exclusions, FsError> {
        let mut patterns = Vec::with_capacity(globs.len());
        for glob in globs {
            let glob = glob.as_ref();
            let trimmed = glob.trim_matches('/');
            if trimmed.is_empty() {
                return Err(FsError::BadExclude(glob.to_owned(), "empty".into()));
            }
            let mut components = Vec::new();
            for component in trimmed.split('/') {
                if component.is_empty() {
                    continue;
                }
                if component == "." || component == ".." {
                    return Err(FsError::BadExclude(
                        glob.to_owned(),
                        "`.` and `..` are not allowed".into(),
                    ));
                }
                if !brackets_balanced(component.as_bytes()) {
                    return Err(FsError::BadExclude(glob.to_owned(), "unclosed `[`".into()));
                }
                components.push(component.as_bytes().to_vec());
            }
            patterns.push(components);
        }
        Ok(Exclusions { patterns })
    }

    /// No globs at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (relative to the root) or one of its ancestors matches a glob.
    pub fn is_excluded(&self, path: &Path) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let components: Vec<&[u8]> = path
            .as_os_str()
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        (1..=components.len()).any(|n| {
            self.patterns
                .iter()
                .any(|p| match_components(p, &components[..n]))
        })
    }

    /// Whether the entry `name` in a directory at `parent` is excluded.
    pub fn is_entry_excluded(&self, parent: &Path, name: &OsStr) -> bool {
        !self.patterns.is_empty() && self.is_excluded(&parent.join(name))
    }
}

fn brackets_balanced(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'[' {
            match class_end(p, i) {
                Some(end) => i = end,
                None => return false,
            }
        }
        i += 1;
    }
    true
}

/// Index of the `]` closing the class opened at `start`.
fn class_end(p: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if i < p.len() && (p[i] == b'!' || p[i] == b'^') {
        i += 1;
    }
    // A `]` right after the opening bracket is a literal member.
    if i < p.len() && p[i] == b']' {
        i += 1;
    }
    while i < p.len() {
        if p[i] == b']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn match_components(pattern: &[Vec<u8>], path: &[&[u8]]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first.as_slice() == b"**" => {
            (0..=path.len()).any(|skip| match_components(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, path_rest)) => match_one(first, name) && match_components(rest, path_rest),
            None => false,
        },
    }
}

/// Matches one component (no `/` on either side).
fn match_one(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    // Backtracking point for the last `*`: (pattern index after it, string index).
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi + 1, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some(end) = class_end(p, pi)
                        && class_matches(&p[pi + 1..end], s[si])
                    {
                        pi = end + 1;
                        si += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((after, from)) => {
                pi = after;
                si = from + 1;
                star = Some((after, from + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

fn class_matches(class: &[u8], c: u8) -> bool {
    let (negate, class) = match class.first() {
        Some(b'!') | Some(b'^') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut found = false;
    let mut i = 0;
    while i < class.len() {
        if i + 2 < class.len() && class[i + 1] == b'-' {
            if class[i] <= c && c <= class[i + 2] {
                found = true;
            }
            i += 3;
        } else {
            if class[i] == c {
                found = true;
            }
            i += 1;
        }
    }
    found != negate
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ex(globs: &[&str]) -> Exclusions {
        Exclusions::new(globs).unwrap()
    }

    #[test]
    fn literal_and_subtree() {
        let e = ex(&["cache"]);
        assert!(e.is_excluded(Path::new("cache")));
        assert!(e.is_excluded(Path::new("cache/a/b")));
        assert!(!e.is_excluded(Path::new("cachex")));
        assert!(!e.is_excluded(Path::new("a/cache")));
        assert!(!e.is_excluded(Path::new("")));
    }

    #[test]
    fn star_stays_in_component() {
        let e = ex(&["*.tmp"]);
        assert!(e.is_excluded(Path::new("x.tmp")));
        assert!(e.is_excluded(Path::new(".tmp")));
        assert!(!e.is_excluded(Path::new("d/x.tmp")));
        let e = ex(&["**/*.tmp"]);
        assert!(e.is_excluded(Path::new("x.tmp")));
        assert!(e.is_excluded(Path::new("d/e/x.tmp")));
        assert!(!e.is_excluded(Path::new("d/e/x.tmpx")));
    }

    #[test]
    fn classes_and_question_mark() {
        let e = ex(&["log[0-9]", "a?c", "[!x]y"]);
        assert!(e.is_excluded(Path::new("log7")));
        assert!(!e.is_excluded(Path::new("logx")));
        assert!(e.is_excluded(Path::new("abc")));
        assert!(!e.is_excluded(Path::new("ac")));
        assert!(e.is_excluded(Path::new("zy")));
        assert!(!e.is_excluded(Path::new("xy")));
    }

    #[test]
    fn double_star_in_the_middle() {
        let e = ex(&["a/**/z"]);
        assert!(e.is_excluded(Path::new("a/z")));
        assert!(e.is_excluded(Path::new("a/b/c/z")));
        assert!(e.is_excluded(Path::new("a/b/z/inner")));
        assert!(!e.is_excluded(Path::new("b/z")));
    }

    #[test]
    fn star_backtracking() {
        assert!(match_one(b"*a*b", b"xaxxab"));
        assert!(!match_one(b"*a*b", b"xaxxa"));
        assert!(match_one(b"**", b"anything"));
        assert!(match_one(b"a*", b"a"));
    }

    #[test]
    fn bad_globs_are_refused() {
        assert!(Exclusions::new(&[""]).is_err());
        assert!(Exclusions::new(&["/"]).is_err());
        assert!(Exclusions::new(&["a/../b"]).is_err());
        assert!(Exclusions::new(&["a[b"]).is_err());
        assert!(Exclusions::new(&["/leading/slash/"]).is_ok());
    }
}
