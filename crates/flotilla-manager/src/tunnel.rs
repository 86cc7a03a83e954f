//! The keys of the nodes' encrypted tunnel (networks created with `--opt encrypted`): the
//! leader makes the first when an encrypted network exists and a new one every
//! [`KEY_LIFETIME_MS`], keeping the previous one so that packets sealed just before a
//! rotation still open. They live in the cluster object (sealed at rest with the rest of the
//! store) and reach the nodes in their network map, over mutual TLS.

use ring::rand::SecureRandom;

use flotilla_types::TunnelKeyRecord;

use crate::error::ManagerError;
use crate::manager::Manager;

/// How long a key seals new packets before the next one takes over.
pub const KEY_LIFETIME_MS: u64 = 12 * 3600 * 1000;

/// How long a new key is only accepted (second in the list) before it seals: every node
/// learns it from its network map first, so no packet sealed with it is refused.
pub const PROMOTE_AFTER_MS: u64 = 60 * 1000;

/// The keys after a rotation check at `now` (pure), newest sealing key first; `None` when
/// nothing changes. With `wanted` (an encrypted network exists): the first key when there is
/// none; when the sealing key is older than `lifetime`, a new key in second place (accepted,
/// not yet sealing; the key before the sealing one is dropped); once that key is
/// [`PROMOTE_AFTER_MS`] old, it moves first. `secret` makes a key (32 bytes, hex).
pub fn rotated(
    keys: &[TunnelKeyRecord],
    wanted: bool,
    now: u64,
    lifetime: u64,
    secret: impl FnOnce() -> Option<String>,
) -> Option<Vec<TunnelKeyRecord>> {
    if !wanted {
        return None;
    }
    let new_id = keys
        .iter()
        .map(|k| k.id)
        .max()
        .map_or(1, |m| m.wrapping_add(1).max(1));
    let Some(first) = keys.first() else {
        return Some(vec![TunnelKeyRecord {
            id: new_id,
            key: secret()?,
            created_at: now,
        }]);
    };
    if let Some(pending) = keys.get(1).filter(|k| k.created_at > first.created_at) {
        if now.saturating_sub(pending.created_at) >= PROMOTE_AFTER_MS {
            return Some(vec![pending.clone(), first.clone()]);
        }
        return None;
    }
    if now.saturating_sub(first.created_at) < lifetime {
        return None;
    }
    Some(vec![
        first.clone(),
        TunnelKeyRecord {
            id: new_id,
            key: secret()?,
            created_at: now,
        },
    ])
}

/// When [`rotated`] will next change `keys` (a pending key's promotion, or the sealing key's
/// end of life), for the control loop's wake-up.
pub fn next_change(keys: &[TunnelKeyRecord], lifetime: u64) -> Option<u64> {
    let first = keys.first()?;
    match keys.get(1).filter(|k| k.created_at > first.created_at) {
        Some(p) => Some(p.created_at.saturating_add(PROMOTE_AFTER_MS)),
        None => Some(first.created_at.saturating_add(lifetime)),
    }
}

/// 32 random bytes from the operating system, hex.
fn new_secret() -> Option<String> {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// Makes or rotates the tunnel keys when an encrypted network exists (leader, control loop).
/// Returns when to look again (`None`: no encrypted network).
pub async fn ensure_keys(mgr: &Manager, now: u64) -> Result<Option<u64>, ManagerError> {
    let wanted = mgr
        .list::<flotilla_types::Network>()?
        .iter()
        .any(|n| n.encrypted);
    let current = mgr.cluster()?.tunnel_keys;
    if !wanted {
        return Ok(None);
    }
    let unchanged = rotated(&current, wanted, now, KEY_LIFETIME_MS, || {
        Some(String::new())
    })
    .is_none();
    if unchanged {
        return Ok(next_change(&current, KEY_LIFETIME_MS));
    }
    let (keys, _) = mgr
        .update_cluster(|c| {
            if let Some(keys) = rotated(&c.tunnel_keys, wanted, now, KEY_LIFETIME_MS, new_secret) {
                let ids: Vec<u32> = keys.iter().map(|k| k.id).collect();
                tracing::info!(?ids, "tunnel keys changed (the first seals)");
                c.tunnel_keys = keys;
            }
            Ok(c.tunnel_keys.clone())
        })
        .await?;
    Ok(next_change(&keys, KEY_LIFETIME_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32, at: u64) -> TunnelKeyRecord {
        TunnelKeyRecord {
            id,
            key: format!("k{id}"),
            created_at: at,
        }
    }

    #[test]
    fn keys_are_made_then_rotated_in_two_steps() {
        let s = || Some("new".to_string());
        let ids = |k: &[TunnelKeyRecord]| k.iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(
            rotated(&[], false, 10, 1000, s),
            None,
            "no encrypted network"
        );
        let first = rotated(&[], true, 10, 1000, s).expect("a first key");
        assert_eq!((first[0].id, first[0].created_at, first.len()), (1, 10, 1));
        assert_eq!(next_change(&first, 1000), Some(1010));
        assert_eq!(rotated(&first, true, 1009, 1000, s), None, "not yet due");
        // Due: the new key is accepted first, not sealing.
        let pending = rotated(&first, true, 1010, 1000, s).expect("a pending key");
        assert_eq!(ids(&pending), [1, 2]);
        assert_eq!(next_change(&pending, 1000), Some(1010 + PROMOTE_AFTER_MS));
        assert_eq!(
            rotated(&pending, true, 1010 + PROMOTE_AFTER_MS - 1, 1000, s),
            None
        );
        // Then it seals; the old one is still accepted.
        let promoted = rotated(&pending, true, 1010 + PROMOTE_AFTER_MS, 1000, s).expect("promoted");
        assert_eq!(ids(&promoted), [2, 1]);
        assert_eq!(next_change(&promoted, 1000), Some(2010));
        // The next rotation drops the oldest.
        let again = rotated(&promoted, true, 5000, 1000, s).expect("pending again");
        assert_eq!(ids(&again), [2, 3]);
        // Ids never reuse 0 (unset) and wrap.
        let wrapped = rotated(&[key(u32::MAX, 0)], true, 5000, 1000, s).expect("rotated");
        assert_eq!(wrapped[1].id, 1);
        // No randomness: no change.
        assert_eq!(rotated(&[], true, 10, 100, || None), None);
        assert_eq!(new_secret().map(|k| k.len()), Some(64));
    }
}
