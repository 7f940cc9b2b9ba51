//! Cyrus's `eatline` (3.6.5:imap/imapparse.c:463-500) as an incremental state machine: after a
//! refused command, skip to the end of the line, stepping over embedded non-synchronising
//! `{N+}` literals (optionally `{N+}\n`) but not over synchronising `{N}` ones (no `+ go ahead`
//! was sent, so the client does not send their data).

/// Where the skipper is inside the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Text,
    /// After `{`, reading the length.
    Digits(u64),
    /// After `{N+`.
    Plus(u64),
    /// After `{N+}`.
    Close(u64),
    /// After `{N+}\r`.
    Cr(u64),
    /// Inside literal data: this many bytes left.
    Literal(u64),
}

/// Skips the rest of one command line across any number of [`feed`](LineSkipper::feed) calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineSkipper {
    state: State,
}

impl LineSkipper {
    /// A skipper positioned just after a character that has already been consumed and was not a
    /// line end (eatline's `c` argument when it is not `\n`).
    pub fn new() -> Self {
        Self::default()
    }

    /// A skipper that starts inside literal data of `remaining` bytes (a refused `{N+}`).
    pub fn in_literal(remaining: u64) -> Self {
        let state = if remaining == 0 {
            State::Text
        } else {
            State::Literal(remaining)
        };
        LineSkipper { state }
    }

    /// Process the `{` case for eatline's first character (a `{` returned by the lexer).
    pub fn after_char(c: u8) -> Self {
        let mut s = Self::new();
        if c == b'{' {
            s.state = State::Digits(0);
        }
        s
    }

    /// Consume input; `Some(n)` when the line ended after `n` bytes of `input`, `None` when all
    /// of `input` was skipped and the line goes on.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if let State::Literal(n) = self.state {
                let take = n.min((input.len() - i) as u64);
                i += take as usize;
                self.state = if take == n {
                    State::Text
                } else {
                    State::Literal(n - take)
                };
                continue;
            }
            let c = input[i];
            i += 1;
            if self.step(c) {
                return Some(i);
            }
        }
        None
    }

    /// One byte outside literal data; true at the end of the line.
    fn step(&mut self, c: u8) -> bool {
        loop {
            match self.state {
                State::Text | State::Literal(_) => {
                    if c == b'\n' {
                        return true;
                    }
                    if c == b'{' {
                        self.state = State::Digits(0);
                    }
                    return false;
                }
                State::Digits(size) => {
                    // Cyrus stops literal parsing (without failing) past 2^32-1.
                    let fits = !(size > 429_496_729 || (size == 429_496_729 && c > b'5'));
                    if c.is_ascii_digit() && fits {
                        self.state = State::Digits(size * 10 + u64::from(c - b'0'));
                        return false;
                    }
                    if c == b'+' {
                        self.state = State::Plus(size);
                        return false;
                    }
                    // `continue` in eatline: look at this byte again as text.
                    self.state = State::Text;
                }
                State::Plus(size) => {
                    if c == b'}' {
                        self.state = State::Close(size);
                        return false;
                    }
                    self.state = State::Text;
                }
                State::Close(size) => {
                    if c == b'\r' {
                        self.state = State::Cr(size);
                        return false;
                    }
                    if c == b'\n' {
                        self.state = State::Literal(size);
                        if size == 0 {
                            self.state = State::Text;
                        }
                        return false;
                    }
                    self.state = State::Text;
                }
                State::Cr(size) => {
                    if c == b'\n' {
                        self.state = if size == 0 {
                            State::Text
                        } else {
                            State::Literal(size)
                        };
                        return false;
                    }
                    self.state = State::Text;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip_all(input: &[u8]) -> Option<usize> {
        LineSkipper::new().feed(input)
    }

    #[test]
    fn plain_line() {
        assert_eq!(skip_all(b"abc\r\nNEXT"), Some(5));
        assert_eq!(skip_all(b"abc"), None);
    }

    #[test]
    fn steps_over_nonsync_literal() {
        // cyrus-mupdate.md §6 case 10: the literal holds a CRLF.
        assert_eq!(skip_all(b"{5+}\r\nab\r\nc\r\nb NOOP\r\n"), Some(13));
        assert_eq!(skip_all(b"{2+}\nab\nX"), Some(8));
    }

    #[test]
    fn does_not_step_over_sync_literal() {
        assert_eq!(skip_all(b"{5}\r\nhello\r\n"), Some(5));
    }

    #[test]
    fn resumes_across_feeds() {
        let input = b"x {10+}\r\n0123456789 y\r\nrest";
        for split in 0..input.len() {
            let mut s = LineSkipper::new();
            let got = match s.feed(&input[..split]) {
                Some(n) => Some(n),
                None => s.feed(&input[split..]).map(|n| n + split),
            };
            assert_eq!(got, Some(23), "split at {split}");
        }
    }

    #[test]
    fn refused_literal_then_line() {
        let mut s = LineSkipper::in_literal(4);
        assert_eq!(s.feed(b"ab\nc\r\nX"), Some(6));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut s = LineSkipper::new();
            if let Some(n) = s.feed(&input) {
                proptest::prop_assert!(n <= input.len());
            }
        }
    }
}
