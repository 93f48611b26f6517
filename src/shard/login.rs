//! Password checks for SMTP AUTH: verified on glommio's blocking pool (argon2id costs tens of
//! milliseconds, which must not stall a shard), with failures slowed per client address.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::Shard;

/// Verifies `password` for `user`; a failure returns only after the client address's
/// throttle delay, and is logged with the client address so an operator can see guessing.
pub async fn verify(
    shard: &Rc<Shard>,
    peer: SocketAddr,
    protocol: &'static str,
    user: String,
    password: String,
) -> bool {
    let users = Arc::clone(&shard.users);
    let logged_user = user.clone();
    let ok = glommio::executor()
        .spawn_blocking(move || users.verify(&user, &password))
        .await;
    if ok {
        shard.throttle.borrow_mut().record_success(peer.ip());
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
