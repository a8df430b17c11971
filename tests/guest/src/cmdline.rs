//! The guest command line: space-separated `key=value` words, of which the
//! kernel reads `case=NAME` and `role=a|b` (docs/DESIGN.md, "Guest start and
//! ABI"). Unknown words are ignored so the VMM can add keys later; the last
//! occurrence of a key wins.

/// What the guest kernel takes from its command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestArgs<'a> {
    /// The case to run (`case=NAME`).
    pub case: Option<&'a str>,
    /// The role in a multi-VM case (`role=a|b`).
    pub role: Option<&'a str>,
}

/// Parse a command line. Never fails: a missing key is `None`.
pub fn parse(line: &str) -> GuestArgs<'_> {
    let mut args = GuestArgs::default();
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "case" => args.case = Some(value),
            "role" => args.role = Some(value),
            _ => {}
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_role() {
        let a = parse("case=two-vms role=b");
        assert_eq!(a.case, Some("two-vms"));
        assert_eq!(a.role, Some("b"));
    }

    #[test]
    fn extra_whitespace_unknown_keys_and_bare_words() {
        let a = parse("  log=debug   case=hello\tquiet  \n");
        assert_eq!(
            a,
            GuestArgs {
                case: Some("hello"),
                role: None
            }
        );
    }

    #[test]
    fn empty_and_missing() {
        assert_eq!(parse(""), GuestArgs::default());
        assert_eq!(parse("role=a").case, None);
    }

    #[test]
    fn last_occurrence_wins_and_empty_value_kept() {
        assert_eq!(parse("case=a case=b").case, Some("b"));
        assert_eq!(parse("case=").case, Some(""));
    }
}
