//! The policies of the mesh, indexed by scope so that a destination's evaluation reaches
//! only the policies that apply to it: the global ones, its namespace's, and the ones its
//! Workload names. Persistent maps: a clone is a cheap snapshot to publish after each push.

use std::sync::Arc;

use imbl::{HashMap, OrdMap};

use super::eval::{ConnectionFacts, Verdict, decide};
use super::model::{Policy, Scope};

/// The destination workload, as far as policy selection needs it.
#[derive(Debug, Clone, Copy)]
pub struct DestinationView<'a> {
    pub namespace: &'a str,
    /// Its Workload's `authorization_policies` (`namespace/name` keys).
    pub policy_keys: &'a [String],
}

/// Policies by key, plus the global and per-namespace indexes (ordered by key, so the
/// DENY reported among several matching ones is always the same).
#[derive(Debug, Clone, Default)]
pub struct PolicyStore {
    by_key: HashMap<Arc<str>, Arc<Policy>>,
    global: OrdMap<Arc<str>, Arc<Policy>>,
    by_namespace: HashMap<String, OrdMap<Arc<str>, Arc<Policy>>>,
}

/// Two stores are equal when they hold the same policies (the indexes follow from them).
impl PartialEq for PolicyStore {
    fn eq(&self, other: &Self) -> bool {
        self.by_key == other.by_key
    }
}

impl PolicyStore {
    /// Adds `policy`, replacing the one of the same key; returns the replaced one.
    pub fn insert(&mut self, policy: Policy) -> Option<Arc<Policy>> {
        let old = self.remove(policy.key());
        let key = policy.shared_key().clone();
        let policy = Arc::new(policy);
        match policy.scope() {
            Scope::Global => {
                self.global.insert(key.clone(), policy.clone());
            }
            Scope::Namespace => {
                let ns = policy.namespace().to_owned();
                self.by_namespace.entry(ns).or_default().insert(key.clone(), policy.clone());
            }
            Scope::WorkloadSelector => {}
        }
        self.by_key.insert(key, policy);
        old
    }

    /// Removes the policy `namespace/name`; returns it if it was there.
    pub fn remove(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.by_key.remove(key)?;
        match old.scope() {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => self.unindex_namespace(old.namespace(), key),
            Scope::WorkloadSelector => {}
        }
        Some(old)
    }

    fn unindex_namespace(&mut self, namespace: &str, key: &str) {
        let Some(set) = self.by_namespace.get_mut(namespace) else { return };
        set.remove(key);
        if set.is_empty() {
            self.by_namespace.remove(namespace);
        }
    }

    /// Whether `other` is this store unchanged (a snapshot of it, or of a copy made without
    /// edits): cheap, and false only when it may differ.
    pub fn is_snapshot_of(&self, other: &Self) -> bool {
        self.by_key.ptr_eq(&other.by_key)
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The policies that apply to `dest`, each once: its namespace's, the global ones, then
    /// those its Workload names (whatever their scope, as ztunnel). Cost: the size of the
    /// answer, not of the store.
    pub fn candidates<'a>(&'a self, dest: DestinationView<'a>) -> impl Iterator<Item = &'a Policy> + Clone + 'a {
        let namespace = self.by_namespace.get(dest.namespace).into_iter().flat_map(|set| set.iter().map(|(_, p)| p));
        let global = self.global.iter().map(|(_, p)| p);
        let named = dest.policy_keys.iter().filter_map(move |k| self.named(k, dest.namespace));
        namespace.chain(global).chain(named).map(|p| &**p)
    }

    /// Policy `key` as named by a workload of `namespace`, unless the indexes give it already.
    fn named(&self, key: &str, namespace: &str) -> Option<&Arc<Policy>> {
        let p = self.by_key.get(key)?;
        let indexed = match p.scope() {
            Scope::Global => true,
            Scope::Namespace => p.namespace() == namespace,
            Scope::WorkloadSelector => false,
        };
        (!indexed).then_some(p)
    }

    /// The keys `dest` names that no policy has (skipped by evaluation; worth a warning:
    /// usually a push in flight, else a policy that never came).
    pub fn unknown_keys<'a>(&'a self, dest: DestinationView<'a>) -> impl Iterator<Item = &'a str> + 'a {
        dest.policy_keys.iter().map(String::as_str).filter(|k| !self.by_key.contains_key(*k))
    }

    /// The decision for a connection to `dest`.
    pub fn evaluate(&self, facts: &ConnectionFacts<'_>, dest: DestinationView<'_>) -> Verdict {
        decide(self.candidates(dest), facts)
    }
}
