//! Codec round trips: whatever the client side encodes, the server side parses back to the
//! same command, in every string form (quoted with escapes, `{n}` with `+ go ahead`, `{n+}`);
//! whatever the server writes, the client decodes back; and no input panics either decoder.

use mupdate::proto::client::{self, Response, StatusKind};
use mupdate::proto::command::{parse, Command, Outcome, Parse, ParseState};
use mupdate::proto::{response, Limits};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Form {
    Quoted,
    Sync,
    NonSync,
}

fn encode_string(out: &mut Vec<u8>, s: &[u8], form: Form) {
    // A quoted string cannot carry CR or LF; those go as literals.
    let form = if matches!(form, Form::Quoted) && s.iter().any(|&b| b == b'\r' || b == b'\n') {
        Form::NonSync
    } else {
        form
    };
    match form {
        Form::Quoted => {
            out.push(b'"');
            for &b in s {
                if b == b'"' || b == b'\\' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
        Form::Sync => {
            out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s);
        }
        Form::NonSync => {
            out.extend_from_slice(format!("{{{}+}}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s);
        }
    }
}

fn encode(tag: &[u8], verb: &str, args: &[&[u8]], forms: &[Form]) -> Vec<u8> {
    let mut out = tag.to_vec();
    out.push(b' ');
    out.extend_from_slice(verb.as_bytes());
    for (i, a) in args.iter().enumerate() {
        out.push(b' ');
        encode_string(&mut out, a, forms[i % forms.len()]);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Parse one command the way the server does, answering `+ go ahead` as needed.
fn parse_one(input: &[u8]) -> (Outcome, usize, usize) {
    let mut state = ParseState {
        authenticated: true,
        literals_acked: 0,
    };
    loop {
        match parse(input, state, &Limits::default()) {
            Parse::GoAhead => state.literals_acked += 1,
            Parse::Done(p) => return (p.outcome, p.consumed, state.literals_acked),
            Parse::Incomplete => panic!("incomplete: {}", mupdate::proto::escape(input)),
        }
    }
}

fn arg() -> impl Strategy<Value = Vec<u8>> {
    // Strings are C strings in Cyrus: no NUL.
    proptest::collection::vec(1u8..=255, 0..40)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        arg().prop_map(|name| Command::Find { name }),
        proptest::option::of(arg()).prop_map(|prefix| Command::List { prefix }),
        (arg(), arg()).prop_map(|(name, location)| Command::Reserve { name, location }),
        (arg(), arg(), arg()).prop_map(|(name, location, acl)| Command::Activate {
            name,
            location,
            acl
        }),
        (arg(), arg()).prop_map(|(name, location)| Command::Deactivate { name, location }),
        arg().prop_map(|name| Command::Delete { name }),
        proptest::collection::vec(proptest::collection::vec(1u8..=255, 1..12), 0..30)
            .prop_map(|hosts| Command::Update { hosts }),
        Just(Command::Noop),
        Just(Command::Logout),
    ]
}

fn wire_form(c: &Command) -> (&'static str, Vec<&[u8]>) {
    match c {
        Command::Find { name } => ("FIND", vec![name]),
        Command::List { prefix } => ("LIST", prefix.iter().map(|p| p.as_slice()).collect()),
        Command::Reserve { name, location } => ("RESERVE", vec![name, location]),
        Command::Activate {
            name,
            location,
            acl,
        } => ("ACTIVATE", vec![name, location, acl]),
        Command::Deactivate { name, location } => ("DEACTIVATE", vec![name, location]),
        Command::Delete { name } => ("DELETE", vec![name]),
        Command::Update { hosts } => ("UPDATE", hosts.iter().map(|h| h.as_slice()).collect()),
        Command::Noop => ("NOOP", vec![]),
        Command::Logout => ("LOGOUT", vec![]),
        other => unreachable!("{other:?}"),
    }
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![Just(Form::Quoted), Just(Form::Sync), Just(Form::NonSync)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn every_string_form_parses_back(cmd in command(), forms in proptest::collection::vec(form(), 1..4), verb_case in 0..3u8) {
        let (verb, args) = wire_form(&cmd);
        let verb = match verb_case {
            0 => verb.to_string(),
            1 => verb.to_ascii_lowercase(),
            _ => verb[..1].to_string() + &verb[1..].to_ascii_lowercase(),
        };
        let bytes = encode(b"t1", &verb, &args, &forms);
        let (outcome, consumed, acked) = parse_one(&bytes);
        prop_assert_eq!(consumed, bytes.len());
        let syncs = (0..args.len()).filter(|i| matches!(forms[i % forms.len()], Form::Sync)).count();
        prop_assert_eq!(acked, syncs, "one + go ahead per synchronising literal");
        prop_assert_eq!(outcome, Outcome::Command { tag: b"t1".to_vec(), command: cmd });
    }

    #[test]
    fn client_encoding_parses_back(cmd in command()) {
        let (verb, args) = wire_form(&cmd);
        let mut bytes = Vec::new();
        client::encode_command(&mut bytes, b"X7", verb, &args);
        let (outcome, consumed, acked) = parse_one(&bytes);
        prop_assert_eq!(consumed, bytes.len());
        prop_assert_eq!(acked, 0, "Cyrus's client form never needs a continuation");
        prop_assert_eq!(outcome, Outcome::Command { tag: b"X7".to_vec(), command: cmd });
    }

    #[test]
    fn server_lines_decode_back(tag in proptest::collection::vec(b'!'..=b'~', 1..8), name in arg(), location in arg(), acl in arg(), kind in 0..4u8) {
        // `+` first would read as a continuation; our clients never use such tags.
        prop_assume!(!tag.contains(&b'{') && !tag.contains(&b'"') && tag[0] != b'+');
        let mut out = Vec::new();
        let want = match kind {
            0 => {
                response::mailbox(&mut out, &tag, &name, &location, &acl);
                Response::Mailbox { tag: tag.clone(), name, location, acl }
            }
            1 => {
                response::reserve(&mut out, &tag, &name, &location);
                Response::Reserve { tag: tag.clone(), name, location }
            }
            2 => {
                response::delete(&mut out, &tag, &name);
                Response::Delete { tag: tag.clone(), name }
            }
            _ => {
                response::tagged(&mut out, &tag, response::Status::No, "mailbox already exists");
                Response::Status { tag: tag.clone(), kind: StatusKind::No, text: b"mailbox already exists".to_vec() }
            }
        };
        let (got, used) = client::decode(&out).unwrap().unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn client_decoder_never_panics(input in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut rest = &input[..];
        // Decode as far as it goes; every step consumes something or stops.
        for _ in 0..400 {
            match client::decode(rest) {
                Ok(Some((_, used))) => {
                    prop_assert!(used > 0 && used <= rest.len());
                    rest = &rest[used..];
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[test]
fn limits_are_enforced_at_each_boundary() {
    let limits = Limits {
        max_word: 10,
        max_quoted: 10,
        max_literal: 10,
        max_command: 1 << 20,
    };
    let st = ParseState {
        authenticated: true,
        literals_acked: 0,
    };
    let reply = |input: &[u8]| match parse(input, st, &limits) {
        Parse::Done(p) => match p.outcome {
            Outcome::Reply(r) => String::from_utf8(r).unwrap(),
            Outcome::Command { .. } => "command".into(),
        },
        other => format!("{other:?}"),
    };
    assert_eq!(reply(b"t FIND \"0123456789\"\r\n"), "command");
    assert_eq!(
        reply(b"t FIND \"0123456789A\"\r\n"),
        "t BAD \"[TOOBIG] Quoted value too long\"\r\n"
    );
    assert_eq!(reply(b"t FIND {10+}\r\n0123456789\r\n"), "command");
    assert_eq!(
        reply(b"t FIND {11+}\r\n"),
        "t BAD \"[TOOBIG] Literal size exceeds fixed limit\"\r\n"
    );
    assert_eq!(reply(b"t FIND {11}\r\n"), "t BAD \"Extra arguments\"\r\n");
    assert_eq!(reply(b"0123456789 NOOP\r\n"), "command");
    assert_eq!(
        reply(b"0123456789A NOOP\r\n"),
        "* BAD \"[TOOBIG] Word too long\"\r\n"
    );
}
