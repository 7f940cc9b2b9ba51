//! Credentials (salted PBKDF2 verifiers) and SASL PLAIN.
