//! Users and argon2id password hashes.
use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};

#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct AuthError(String);

/// argon2id with m=19456 KiB, t=2, p=1 (SPEC §2), as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let params = argon2::Params::new(19456, 2, 1, None).map_err(|e| AuthError(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError(e.to_string()))
}
