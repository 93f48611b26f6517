//! Password checks for SMTP AUTH: verified on glommio's blocking pool (argon2id costs tens of
//! milliseconds, which must not stall a shard), with failures slowed per client address.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::Shard;

/// Verifies `password` for `user`. An address with failures on record waits for its next
/// slot before the check (see [`crate::throttle`]); a failure returns only after the
/// address's throttle delay, and is logged with the client address so an operator can see
/// guessing.
pub async fn verify(
    shard: &Rc<Shard>,
    peer: SocketAddr,
    protocol: &'static str,
    user: String,
    password: String,
) -> bool {
    let wait = shard
        .throttle
        .borrow_mut()
        .admit_attempt(peer.ip(), Instant::now());
    if !wait.is_zero() {
        tracing::info!(shard = shard.id, client = %peer.ip(), "{protocol} login attempt waits {wait:?} for its slot after failures");
        glommio::timer::sleep(wait).await;
    }
    let users = Arc::clone(&shard.users);
    let logged_user = user.clone();
    let ok = glommio::executor()
        .spawn_blocking(move || users.verify(&user, &password))
        .await;
    if ok {
        tracing::info!(shard = shard.id, client = %peer.ip(), user = %logged_user, "{protocol} login succeeded");
    } else {
        let delay = shard
            .throttle
            .borrow_mut()
            .record_failure(peer.ip(), Instant::now());
        tracing::warn!(shard = shard.id, client = %peer.ip(), user = %logged_user, "{protocol} login failed; answering in {delay:?}");
        glommio::timer::sleep(delay).await;
    }
    ok
}
