//! The engine's indexes, kept in step with every agent change so that no event has to scan
//! all agents: each pool's members and its idle agents ordered by idle-since, the pools each
//! lease selector matches (cached per selector text until a pool changes), and the pools an
//! event touched (sized by the next [`Engine::reconcile`]; `tick` sizes every pool, so a pool
//! missed here is still repaired within one tick).
//!
//! All agent inserts, removals and state changes go through this file.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Instant;

use super::*;

/// Selector texts remembered at most; the cache is dropped when it grows past this.
const MATCH_CACHE_MAX: usize = 4096;

/// Key of an idle agent in its pool's idle index: idle since, then the smaller id first
/// among agents idle since the same instant (iteration from the back yields the best).
pub(super) type IdleKey = (Instant, Reverse<AgentId>);

impl Engine {
    /// Adds an agent to the map and its pool's indexes.
    pub(super) fn insert_agent(&mut self, a: Agent) {
        let p = self.pools.get_mut(&a.pool).expect("agent of a known pool");
        p.members.insert(a.id.clone());
        if a.state == AgentState::Idle {
            p.idle.insert((a.since, Reverse(a.id.clone())));
        }
        self.dirty.insert(a.pool.clone());
        self.agents.insert(a.id.clone(), a);
    }

    /// Removes an agent from the map and its pool's indexes; a removed pool goes with its last
    /// agent.
    pub(super) fn remove_agent(&mut self, id: &str) -> Option<Agent> {
        let a = self.agents.remove(id)?;
        if let Some(p) = self.pools.get_mut(&a.pool) {
            p.members.remove(id);
            if a.state == AgentState::Idle {
                p.idle.remove(&(a.since, Reverse(a.id.clone())));
            }
            if p.removed && p.members.is_empty() {
                self.pools.remove(&a.pool);
                self.matches.clear();
            } else {
                self.dirty.insert(a.pool.clone());
            }
        }
        Some(a)
    }

    pub(super) fn set_state(&mut self, id: &str, state: AgentState, now: Instant) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        tracing::debug!(agent = id, pool = %a.pool, from = a.state.as_str(), to = state.as_str(), "agent state");
        let p = self.pools.get_mut(&a.pool).expect("agent of a known pool");
        if a.state == AgentState::Idle {
            p.idle.remove(&(a.since, Reverse(a.id.clone())));
        }
        a.state = state;
        a.since = now;
        if state == AgentState::Idle {
            p.idle.insert((now, Reverse(a.id.clone())));
        }
        self.dirty.insert(a.pool.clone());
    }

    /// Forgets cached selector matches (a pool was added, changed or removed).
    pub(super) fn pools_changed(&mut self) {
        self.matches.clear();
        self.all_dirty = true;
    }

    /// Names of the live pools whose labels a selector matches, by name.
    pub(super) fn matching_pools(&mut self, req: &LeaseRequest) -> Arc<[String]> {
        matching(&self.pools, &mut self.matches, req)
    }

    /// The best idle agent for a request: a fresh one before a stale one, then the most
    /// recently idle (keeps the rest idle long enough for idleTtl to scale them down), then
    /// the smallest id. Looks only at the idle indexes of the matching pools, so its cost does
    /// not grow with the number of agents.
    pub fn find_agent(&mut self, req: &LeaseRequest, now: Instant) -> Option<AgentId> {
        find(&self.pools, &self.agents, &mut self.matches, req, now)
    }

    /// Checks that the indexes agree with the agents (tests).
    pub(super) fn check_index(&self) -> Result<(), String> {
        for (name, p) in &self.pools {
            for id in &p.members {
                match self.agents.get(id) {
                    Some(a) if &a.pool == name => {}
                    _ => return Err(format!("pool {name} lists agent {id} it does not have")),
                }
            }
            for (since, Reverse(id)) in &p.idle {
                match self.agents.get(id) {
                    Some(a) if a.state == AgentState::Idle && a.since == *since => {}
                    _ => return Err(format!("pool {name} idle index lists {id} wrongly")),
                }
            }
        }
        for a in self.agents.values() {
            let p = self
                .pools
                .get(&a.pool)
                .ok_or_else(|| format!("agent {} of missing pool {}", a.id, a.pool))?;
            if !p.members.contains(&a.id) {
                return Err(format!("agent {} missing from pool {}", a.id, a.pool));
            }
            if a.state == AgentState::Idle && !p.idle.contains(&(a.since, Reverse(a.id.clone()))) {
                return Err(format!("idle agent {} missing from the idle index", a.id));
            }
        }
        Ok(())
    }
}

/// See [`Engine::matching_pools`] (free so callers can borrow other fields meanwhile).
pub(super) fn matching(
    pools: &BTreeMap<String, Pool>,
    cache: &mut HashMap<String, Arc<[String]>>,
    req: &LeaseRequest,
) -> Arc<[String]> {
    if let Some(m) = cache.get(&req.selector_text) {
        return m.clone();
    }
    let m: Arc<[String]> = pools
        .iter()
        .filter(|(_, p)| {
            !p.removed && !externally_leased(&p.spec) && req.selector.matches(&p.labels)
        })
        .map(|(n, _)| n.clone())
        .collect();
    if cache.len() >= MATCH_CACHE_MAX {
        cache.clear();
    }
    cache.insert(req.selector_text.clone(), m.clone());
    m
}

/// See [`Engine::find_agent`].
pub(super) fn find(
    pools: &BTreeMap<String, Pool>,
    agents: &HashMap<AgentId, Agent>,
    cache: &mut HashMap<String, Arc<[String]>>,
    req: &LeaseRequest,
    now: Instant,
) -> Option<AgentId> {
    let names = matching(pools, cache, req);
    let mut best: Option<(bool, &IdleKey)> = None;
    for name in names.iter() {
        let Some(p) = pools.get(name) else { continue };
        if p.removed {
            continue;
        }
        let mut cand = None;
        for key in p.idle.iter().rev() {
            let a = &agents[&key.1.0];
            let stale = a.retire || now.duration_since(a.created) >= p.spec.max_age.0;
            if !stale {
                cand = Some((true, key));
                break;
            }
            if cand.is_none() {
                cand = Some((false, key));
            }
        }
        if let Some(c) = cand
            && best.is_none_or(|b| c > b)
        {
            best = Some(c);
        }
    }
    best.map(|(_, key)| key.1.0.clone())
}
