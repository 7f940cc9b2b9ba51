//! Credentials (salted PBKDF2 verifiers) and SASL PLAIN.
//!
//! A [`Verifier`] holds exactly what a SCRAM-SHA-256 server keeps (RFC 5802 §3, RFC 7677):
//! iteration count, salt, `StoredKey` and `ServerKey`. PLAIN checks a password by recomputing
//! `StoredKey`; SCRAM can be added later from the same stored data, without anyone re-entering
//! a password. Passwords are never stored, logged or kept past the call that checks them.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::store::Result;

/// PBKDF2 iterations for new verifiers: RFC 7677's minimum for SCRAM-SHA-256, and what Cyrus
/// SASL uses.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// The first byte of an encoded [`Verifier`].
pub const VERIFIER_FORMAT: u8 = 1;
/// Length of [`Verifier::encode`]: format, iterations (u32 BE), salt, StoredKey, ServerKey.
const ENCODED_LEN: usize = 1 + 4 + 16 + 32 + 32;

type HmacSha256 = Hmac<Sha256>;

/// A SCRAM-SHA-256 style password verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

// Keys stay out of logs and panic messages: a StoredKey is enough to impersonate a SCRAM
// server, and with the salt it allows an offline guessing attack on the password.
impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length, so this never fails.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// `(StoredKey, ServerKey)` of RFC 5802 for one password, salt and iteration count.
fn derive(password: &[u8], salt: &[u8; 16], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let salted: [u8; 32] = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    (stored_key, server_key)
}

/// Compare without an early exit, so the time taken does not tell how many bytes matched.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Verifier {
    /// A verifier for `password` with a fresh random salt. `iterations` below 1 is taken as 1.
    /// Fails only when the operating system's random source does.
    pub fn new(password: impl AsRef<[u8]>, iterations: u32) -> std::io::Result<Verifier> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Verifier::with_salt(password, iterations, salt))
    }

    /// A verifier with a given salt (for tests and for importing SCRAM secrets' inputs).
    pub fn with_salt(password: impl AsRef<[u8]>, iterations: u32, salt: [u8; 16]) -> Verifier {
        let iterations = iterations.max(1);
        let (stored_key, server_key) = derive(password.as_ref(), &salt, iterations);
        Verifier {
            iterations,
            salt,
            stored_key,
            server_key,
        }
    }

    /// Rebuild a verifier from SCRAM-SHA-256 secrets (e.g. imported from another server).
    pub fn from_parts(
        iterations: u32,
        salt: [u8; 16],
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> Verifier {
        Verifier {
            iterations: iterations.max(1),
            salt,
            stored_key,
            server_key,
        }
    }

    /// Whether `password` is the one this verifier was made from. Costs `iterations` PBKDF2
    /// rounds; the final comparison is constant-time.
    pub fn verify(&self, password: impl AsRef<[u8]>) -> bool {
        let (stored_key, _) = derive(password.as_ref(), &self.salt, self.iterations);
        ct_eq(&stored_key, &self.stored_key)
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8; 16] {
        &self.salt
    }

    /// SCRAM's `StoredKey` = SHA-256(HMAC(SaltedPassword, "Client Key")).
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// SCRAM's `ServerKey` = HMAC(SaltedPassword, "Server Key").
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }

    /// The stored form: `u8 1 | u32 BE iterations | salt[16] | StoredKey[32] | ServerKey[32]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(VERIFIER_FORMAT);
        out.extend_from_slice(&self.iterations.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.stored_key);
        out.extend_from_slice(&self.server_key);
        out
    }

    /// Parse [`encode`](Self::encode)'s output. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Verifier, String> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err("empty verifier".into());
        };
        if version != VERIFIER_FORMAT {
            return Err(format!("unknown verifier format {version}"));
        }
        if bytes.len() != ENCODED_LEN {
            return Err(format!(
                "verifier is {} bytes, expected {ENCODED_LEN}",
                bytes.len()
            ));
        }
        let (iterations, rest) = rest.split_at(4);
        let (salt, rest) = rest.split_at(16);
        let (stored_key, server_key) = rest.split_at(32);
        let iterations = u32::from_be_bytes(iterations.try_into().map_err(|_| "iterations")?);
        if iterations == 0 {
            return Err("verifier has 0 iterations".into());
        }
        Ok(Verifier {
            iterations,
            salt: salt.try_into().map_err(|_| "salt")?,
            stored_key: stored_key.try_into().map_err(|_| "stored key")?,
            server_key: server_key.try_into().map_err(|_| "server key")?,
        })
    }
}

/// Where user verifiers live. Implemented by [`crate::store::lmdb::LmdbStore`] (database
/// `users`), so `mupdated user add` can write while the server runs.
pub trait UserStore {
    fn get_user(&self, name: &str) -> Result<Option<Verifier>>;
    /// Create or replace; durable when it returns.
    fn put_user(&self, name: &str, v: &Verifier) -> Result<()>;
    /// Whether the user existed.
    fn delete_user(&self, name: &str) -> Result<bool>;
    /// Every user name, in byte order.
    fn list_users(&self) -> Result<Vec<String>>;
}

/// Parse a SASL PLAIN message (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`.
///
/// Returns `(authzid, authcid, password)`; an absent authzid is `""` (the caller then acts as
/// `authcid`). `None` for anything the RFC's grammar refuses: not exactly two NULs, an empty
/// authcid or password, or identities that are not UTF-8. The password is returned as bytes
/// (borrowed from the message; nothing is copied or kept).
pub fn parse_plain(message: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let password = parts.next()?;
    if authcid.is_empty() || password.is_empty() || password.contains(&0) {
        return None;
    }
    Some((
        std::str::from_utf8(authzid).ok()?,
        std::str::from_utf8(authcid).ok()?,
        password,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_and_wrong_passwords() {
        let v = Verifier::new("s3cret", 64).unwrap();
        assert!(v.verify("s3cret"));
        assert!(v.verify(b"s3cret".as_slice()));
        assert!(!v.verify("s3creT"));
        assert!(!v.verify(""));
        assert!(!v.verify("s3cre"));
        assert!(!v.verify("s3cret "));
        // Not asserted: "s3cret\0" verifies too. HMAC zero-pads short keys, so PBKDF2-HMAC
        // (and therefore SCRAM) cannot tell trailing NULs apart; PLAIN cannot carry a NUL in a
        // password anyway (`parse_plain` refuses it).
    }

    #[test]
    fn salts_are_random() {
        let a = Verifier::new("pw", 1).unwrap();
        let b = Verifier::new("pw", 1).unwrap();
        assert_ne!(a.salt(), b.salt());
        assert_ne!(a.stored_key(), b.stored_key());
    }

    #[test]
    fn default_iterations_work() {
        let v = Verifier::new("pw", DEFAULT_ITERATIONS).unwrap();
        assert_eq!(v.iterations(), 4096);
        assert!(v.verify("pw"));
    }

    /// RFC 7677 §3's SCRAM-SHA-256 example: user "user", password "pencil", salt
    /// `W22ZaJ0SNY7soEsUEjb6gQ==`, 4096 iterations. ClientProof = ClientKey XOR ClientSignature,
    /// so from the exchange we can check our StoredKey and ServerKey against the RFC's values.
    #[test]
    fn matches_rfc7677_example() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt: [u8; 16] = b64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap()
            .try_into()
            .unwrap();
        let v = Verifier::with_salt("pencil", 4096, salt);
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
             r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
             c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = b64
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        let signature = hmac(v.stored_key(), auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        assert_eq!(&stored, v.stored_key());
        let server_sig = hmac(v.server_key(), auth_message.as_bytes());
        assert_eq!(
            b64.encode(server_sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn encode_decode() {
        let v = Verifier::new("pw", 7).unwrap();
        let enc = v.encode();
        assert_eq!(enc.len(), ENCODED_LEN);
        assert_eq!(enc[0], VERIFIER_FORMAT);
        let back = Verifier::decode(&enc).unwrap();
        assert_eq!(back, v);
        assert!(back.verify("pw"));
        assert!(Verifier::decode(&[]).is_err());
        assert!(Verifier::decode(&enc[..enc.len() - 1]).is_err());
        let mut long = enc.clone();
        long.push(0);
        assert!(Verifier::decode(&long).is_err());
        let mut other = enc.clone();
        other[0] = 2;
        assert!(Verifier::decode(&other).is_err());
        let mut zero = enc;
        zero[1..5].copy_from_slice(&[0; 4]);
        assert!(Verifier::decode(&zero).is_err());
    }

    #[test]
    fn debug_hides_keys() {
        let v = Verifier::with_salt("pw", 1, [7; 16]);
        let shown = format!("{v:?}");
        assert!(
            !shown.contains("stored_key") && !shown.contains("salt"),
            "{shown}"
        );
    }

    #[test]
    fn plain_parsing() {
        assert_eq!(parse_plain(b"\0bob\0pw"), Some(("", "bob", &b"pw"[..])));
        assert_eq!(
            parse_plain(b"admin\0bob\0p w"),
            Some(("admin", "bob", &b"p w"[..]))
        );
        assert_eq!(
            parse_plain(b"\0bob\0\xffpw"),
            Some(("", "bob", &b"\xffpw"[..]))
        );
        assert_eq!(parse_plain(b""), None);
        assert_eq!(parse_plain(b"bob"), None);
        assert_eq!(parse_plain(b"\0bob"), None, "one NUL");
        assert_eq!(parse_plain(b"\0\0pw"), None, "empty authcid");
        assert_eq!(parse_plain(b"\0bob\0"), None, "empty password");
        assert_eq!(parse_plain(b"\0bob\0pw\0"), None, "extra NUL");
        assert_eq!(parse_plain(b"\0bob\0p\0w"), None, "extra NUL");
        assert_eq!(parse_plain(b"\0b\xffob\0pw"), None, "authcid not UTF-8");
        assert_eq!(parse_plain(b"\xff\0bob\0pw"), None, "authzid not UTF-8");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let _ = Verifier::decode(&bytes);
        }

        #[test]
        fn plain_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            if let Some((z, c, p)) = parse_plain(&bytes) {
                let rebuilt = [z.as_bytes(), b"\0", c.as_bytes(), b"\0", p].concat();
                proptest::prop_assert_eq!(rebuilt, bytes);
            }
        }
    }
}
