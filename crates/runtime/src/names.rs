//! Reservation of sandbox and container names.
//!
//! kubelet may send the same `RunPodSandbox` twice when a call times out, and
//! both may run at once. The first to reserve the name wins; the other gets
//! `AlreadyExists` naming the owner, as kubelet expects from containerd.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Errors of the name registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is reserved for another id. The CRI maps this to `AlreadyExists`.
    #[error(
        "name {name:?} is already reserved for {owner_id}: remove {owner_id} first, or wait for its creation to finish"
    )]
    Reserved {
        /// The requested name.
        name: String,
        /// The id of the sandbox or container that owns the name.
        owner_id: String,
    },
}

/// Builds a sandbox name from the CRI `PodSandboxMetadata` fields.
///
/// `attempt` is part of the name so that kubelet can create a new sandbox for
/// the same pod while the old one still exists.
pub fn sandbox_name(name: &str, namespace: &str, uid: &str, attempt: u32) -> String {
    format!("{name}_{namespace}_{uid}_{attempt}")
}

/// A map from each reserved name to the id that owns it. Clones share the map.
#[derive(Debug, Clone, Default)]
pub struct NameRegistry {
    names: Arc<Mutex<HashMap<String, String>>>,
}

impl NameRegistry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves `name` for `id`, or fails with the id that owns it.
    ///
    /// Reserving a name again for its owner succeeds. That second guard does
    /// not release the name on drop, because the first reservation owns it.
    pub fn reserve(&self, name: &str, id: &str) -> Result<Reservation, NameError> {
        let mut names = lock(&self.names);
        let owns_name = match names.get(name) {
            Some(owner) if owner == id => false,
            Some(owner) => {
                return Err(NameError::Reserved {
                    name: name.to_owned(),
                    owner_id: owner.clone(),
                });
            }
            None => {
                names.insert(name.to_owned(), id.to_owned());
                true
            }
        };
        drop(names);

        Ok(Reservation {
            names: Arc::clone(&self.names),
            name: name.to_owned(),
            id: id.to_owned(),
            armed: owns_name,
        })
    }

    /// Frees `name`. Freeing a name that is not reserved does nothing.
    pub fn release(&self, name: &str) {
        lock(&self.names).remove(name);
    }

    /// Frees every name that `id` owns. An id that owns none is fine.
    pub fn release_by_id(&self, id: &str) {
        lock(&self.names).retain(|_, owner| owner != id);
    }

    /// Returns the id that owns `name`, if any.
    pub fn owner(&self, name: &str) -> Option<String> {
        lock(&self.names).get(name).cloned()
    }
}

/// A reserved name that is freed on drop unless [`Reservation::commit`] is called,
/// so a creation that fails at any step gives its name back.
#[derive(Debug)]
#[must_use = "dropping a reservation frees the name at once"]
pub struct Reservation {
    names: Arc<Mutex<HashMap<String, String>>>,
    name: String,
    id: String,
    armed: bool,
}

impl Reservation {
    /// Returns the reserved name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the id that owns the name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Keeps the name reserved after the guard is gone. Free it later with
    /// [`NameRegistry::release`] or [`NameRegistry::release_by_id`].
    pub fn commit(mut self) {
        self.armed = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }

        // The name may have been released and reserved by another id since.
        let mut names = lock(&self.names);
        if names.get(&self.name) == Some(&self.id) {
            names.remove(&self.name);
        }
    }
}

/// Locks the map and ignores poison, because every change is a single insert
/// or remove that a panicking thread cannot leave half done.
fn lock(names: &Mutex<HashMap<String, String>>) -> MutexGuard<'_, HashMap<String, String>> {
    names.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    #[test]
    fn sandbox_name_joins_metadata_with_underscores() {
        assert_eq!(
            sandbox_name("web", "default", "0b3c-uid", 2),
            "web_default_0b3c-uid_2"
        );
    }

    #[test]
    fn concurrent_reserves_have_one_winner() {
        const THREADS: usize = 16;
        let registry = NameRegistry::new();
        let barrier = Arc::new(Barrier::new(THREADS));

        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let registry = registry.clone();
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let id = format!("sandbox-{i}");
                    barrier.wait();
                    registry.reserve("web_default_uid_0", &id).map(|r| {
                        r.commit();
                        id
                    })
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("reserving thread panicked"))
            .collect();

        let winners: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "results: {results:?}");
        let winner = winners[0].clone();
        for result in &results {
            if let Err(err) = result {
                assert_eq!(
                    err,
                    &NameError::Reserved {
                        name: "web_default_uid_0".to_owned(),
                        owner_id: winner.clone(),
                    }
                );
                assert!(err.to_string().contains(&winner));
            }
        }
        assert_eq!(registry.owner("web_default_uid_0"), Some(winner));
    }

    #[test]
    fn second_reserve_names_the_owner() {
        let registry = NameRegistry::new();
        registry
            .reserve("a", "id-1")
            .expect("first reserve")
            .commit();

        let err = registry.reserve("a", "id-2").expect_err("name is held");

        assert_eq!(
            err,
            NameError::Reserved {
                name: "a".to_owned(),
                owner_id: "id-1".to_owned(),
            }
        );
    }

    #[test]
    fn reserve_again_with_same_id_succeeds() {
        let registry = NameRegistry::new();
        let first = registry.reserve("a", "id-1").expect("first reserve");

        let second = registry.reserve("a", "id-1").expect("same id again");
        drop(second);

        assert_eq!(registry.owner("a").as_deref(), Some("id-1"));
        drop(first);
        assert_eq!(registry.owner("a"), None);
    }

    #[test]
    fn drop_without_commit_releases_the_name() {
        let registry = NameRegistry::new();
        let reservation = registry.reserve("a", "id-1").expect("reserve");
        assert_eq!(reservation.name(), "a");
        assert_eq!(reservation.id(), "id-1");

        drop(reservation);

        assert_eq!(registry.owner("a"), None);
        registry
            .reserve("a", "id-2")
            .expect("name is free again")
            .commit();
    }

    #[test]
    fn commit_keeps_the_name() {
        let registry = NameRegistry::new();
        registry.reserve("a", "id-1").expect("reserve").commit();

        assert_eq!(registry.owner("a").as_deref(), Some("id-1"));
        assert!(registry.reserve("a", "id-2").is_err());
    }

    #[test]
    fn release_twice_is_fine() {
        let registry = NameRegistry::new();
        registry.reserve("a", "id-1").expect("reserve").commit();

        registry.release("a");
        registry.release("a");

        assert_eq!(registry.owner("a"), None);
    }

    #[test]
    fn release_by_id_frees_only_that_ids_names() {
        let registry = NameRegistry::new();
        registry.reserve("a", "id-1").expect("reserve a").commit();
        registry.reserve("b", "id-1").expect("reserve b").commit();
        registry.reserve("c", "id-2").expect("reserve c").commit();

        registry.release_by_id("id-1");
        registry.release_by_id("id-1");

        assert_eq!(registry.owner("a"), None);
        assert_eq!(registry.owner("b"), None);
        assert_eq!(registry.owner("c").as_deref(), Some("id-2"));
    }

    #[test]
    fn stale_guard_keeps_new_owner() {
        let registry = NameRegistry::new();
        let stale = registry.reserve("a", "id-1").expect("reserve");
        registry.release("a");
        registry
            .reserve("a", "id-2")
            .expect("reserve after release")
            .commit();

        drop(stale);

        assert_eq!(registry.owner("a").as_deref(), Some("id-2"));
    }
}
