//! The engine's indexes, kept in step with every agent change so that no event has to scan
//! all agents or all of a pool's agents: each pool's members, its agents counted by state, its
//! idle agents split into fresh and stale (each ordered by idle-since), its fresh idle agents
//! by creation time (the next to pass `maxAge` first), its Cleaning agents still within the
//! cleaning grace (by cleaning-since), the pools each lease selector matches (cached per
//! selector text until a pool changes), and the pools an event touched (sized by the next
//! [`Engine::reconcile`]; `tick` sizes every pool, so a pool missed here is still repaired
//! within one tick).
//!
//! Staleness and the cleaning grace depend on time: they are brought up to date lazily
//! ([`promote`]) before a pool is sized or searched, each agent moving at most once, so the
//! cost is amortised O(1) per agent.
//!
//! All agent inserts, removals and state changes go through this file (and with them the
//! agent's deadline, `deadlines.rs`).

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Selector texts remembered at most; the cache is dropped when it grows past this.
const MATCH_CACHE_MAX: usize = 4096;

/// Key of an idle agent in its pool's idle indexes: idle since, then the smaller id first
/// among agents idle since the same instant (iteration from the back yields the best).
pub(super) type IdleKey = (Instant, Reverse<AgentId>);

/// Index of a state in [`Pool::counts`].
pub(super) fn slot(s: AgentState) -> usize {
    s as usize
}

/// True when an agent is stale at `now`: retired, or past its pool's `maxAge`.
pub(super) fn stale_at(a: &Agent, max_age: Duration, now: Instant) -> bool {
    a.retire || now.duration_since(a.created) >= max_age
}

/// Adds an agent, in its current state, to its pool's state indexes.
fn enter(p: &mut Pool, a: &Agent, now: Instant) {
    p.counts[slot(a.state)] += 1;
    match a.state {
        AgentState::Idle if stale_at(a, p.spec.max_age.0, now) => {
            p.stale.insert((a.since, Reverse(a.id.clone())));
        }
        AgentState::Idle => {
            p.fresh.insert((a.since, Reverse(a.id.clone())));
            p.by_created.insert((a.created, a.id.clone()));
        }
        // Cleaning is entered only by an agent that will be reused (see
        // `Engine::recycle_after_lease`): it counts as supply within the grace.
        AgentState::Cleaning if !a.retire => {
            p.cleaning.insert((a.since, a.id.clone()));
        }
        _ => {}
    }
}

/// Removes an agent, in its current state, from its pool's state indexes.
fn leave(p: &mut Pool, a: &Agent) {
    p.counts[slot(a.state)] -= 1;
    match a.state {
        AgentState::Idle => {
            let key = (a.since, Reverse(a.id.clone()));
            if p.fresh.remove(&key) {
                p.by_created.remove(&(a.created, key.1.0));
            } else {
                p.stale.remove(&key);
            }
        }
        AgentState::Cleaning => {
            p.cleaning.remove(&(a.since, a.id.clone()));
        }
        _ => {}
    }
}

/// Brings a pool's time-dependent indexes up to `now`: fresh idle agents past `maxAge` become
/// stale, Cleaning agents past the cleaning grace stop counting as supply. Each agent moves at
/// most once per stay in a state (amortised O(1)).
pub(super) fn promote(
    p: &mut Pool,
    agents: &HashMap<AgentId, Agent>,
    grace: Duration,
    now: Instant,
) {
    let max_age = p.spec.max_age.0;
    while let Some((created, _)) = p.by_created.first() {
        if now.duration_since(*created) < max_age {
            break;
        }
        let (_, id) = p.by_created.pop_first().expect("not empty");
        let key = (agents[&id].since, Reverse(id));
        p.fresh.remove(&key);
        p.stale.insert(key);
    }
    while let Some((since, _)) = p.cleaning.first() {
        if now.duration_since(*since) < grace {
            break;
        }
        p.cleaning.pop_first();
    }
}

/// The first agent of an idle index in (idle-since, id) order: the oldest idle, the smallest
/// id among those idle since the same instant.
pub(super) fn oldest(set: &BTreeSet<IdleKey>) -> Option<AgentId> {
    let (since, _) = set.first()?;
    // Among keys with the same instant the smallest id sorts last (`Reverse`), and
    // `Reverse("")` is above every other id.
    set.range(..=(*since, Reverse(String::new())))
        .next_back()
        .map(|k| k.1.0.clone())
}

impl Engine {
    /// Adds an agent to the map and its pool's indexes.
    pub(super) fn insert_agent(&mut self, a: Agent, now: Instant) {
        let p = self.pools.get_mut(&a.pool).expect("agent of a known pool");
        p.members.insert(a.id.clone());
        enter(p, &a, now);
        if a.state == AgentState::Idle {
            p.policy.idle_changed(now, p.counts[slot(AgentState::Idle)]);
        }
        mark_dirty(&mut self.dirty, &a.pool);
        let id = a.id.clone();
        self.agents.insert(a.id.clone(), a);
        self.schedule(&id);
    }

    /// Removes an agent from the map and its pool's indexes; a removed pool goes with its last
    /// agent.
    pub(super) fn remove_agent(&mut self, id: &str) -> Option<Agent> {
        let a = self.agents.remove(id)?;
        if let Some(p) = self.pools.get_mut(&a.pool) {
            p.members.remove(id);
            leave(p, &a);
            if p.removed && p.members.is_empty() {
                self.pools.remove(&a.pool);
                self.matches.clear();
            } else {
                mark_dirty(&mut self.dirty, &a.pool);
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
        leave(p, a);
        a.state = state;
        a.since = now;
        enter(p, a, now);
        p.policy.idle_changed(now, p.counts[slot(AgentState::Idle)]);
        mark_dirty(&mut self.dirty, &a.pool);
        self.schedule(id);
    }

    /// Marks an agent for replacement: an idle one becomes stale at once, a Cleaning one stops
    /// counting as supply.
    pub(super) fn mark_retired(&mut self, id: &str) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        let p = self.pools.get_mut(&a.pool).expect("agent of a known pool");
        leave(p, a);
        a.retire = true;
        // `enter` only reads `now` for an agent not retired.
        enter(p, a, a.since);
        mark_dirty(&mut self.dirty, &a.pool);
    }

    /// Files a pool's agents again after its spec changed (`maxAge` decides fresh or stale)
    /// and brings their deadlines forward where the spec shortened them.
    pub(super) fn reindex_pool(&mut self, name: &str, now: Instant) {
        let Some(p) = self.pools.get_mut(name) else {
            return;
        };
        let ids: Vec<AgentId> = p.members.iter().cloned().collect();
        for id in &ids {
            let a = &self.agents[id];
            if a.state == AgentState::Idle {
                leave(p, a);
                enter(p, a, now);
            }
        }
        for id in &ids {
            self.schedule(id);
        }
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
        find(
            &mut self.pools,
            &self.agents,
            &mut self.matches,
            self.cfg.cleaning_grace,
            req,
            now,
        )
    }

    /// Checks that the indexes agree with the agents, counted from scratch (tests): members,
    /// counts by state, fresh and stale idle agents, the creation-time index, Cleaning agents
    /// within the grace (as far as `promote` brought them up to date), and deadlines.
    pub(super) fn check_index(&self) -> Result<(), String> {
        for (name, p) in &self.pools {
            let mut counts = [0u32; 6];
            for id in &p.members {
                match self.agents.get(id) {
                    Some(a) if &a.pool == name => counts[slot(a.state)] += 1,
                    _ => return Err(format!("pool {name} lists agent {id} it does not have")),
                }
            }
            if counts != p.counts {
                return Err(format!(
                    "pool {name} counts {:?} by state, a recount gives {counts:?}",
                    p.counts
                ));
            }
            if p.fresh.len() + p.stale.len() != counts[slot(AgentState::Idle)] as usize {
                return Err(format!(
                    "pool {name}: {} fresh + {} stale idle, {} idle agents",
                    p.fresh.len(),
                    p.stale.len(),
                    counts[slot(AgentState::Idle)]
                ));
            }
            for (set, fresh) in [(&p.fresh, true), (&p.stale, false)] {
                for (since, Reverse(id)) in set {
                    match self.agents.get(id) {
                        Some(a) if a.state == AgentState::Idle && a.since == *since => {
                            if fresh
                                && (a.retire || !p.by_created.contains(&(a.created, id.clone())))
                            {
                                return Err(format!("pool {name}: {id} wrongly fresh"));
                            }
                        }
                        _ => return Err(format!("pool {name} idle index lists {id} wrongly")),
                    }
                }
            }
            if p.by_created.len() != p.fresh.len() {
                return Err(format!("pool {name}: creation index out of step"));
            }
            for (since, id) in &p.cleaning {
                match self.agents.get(id) {
                    Some(a)
                        if a.state == AgentState::Cleaning && a.since == *since && !a.retire => {}
                    _ => return Err(format!("pool {name} cleaning index lists {id} wrongly")),
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
        }
        self.check_deadlines()
    }

    /// Like [`Engine::check_index`], after bringing every pool up to `now`: the fresh and
    /// stale idle agents and the Cleaning agents counted as supply must be exactly those a
    /// from-scratch pass at `now` finds (tests).
    #[cfg(test)]
    pub(super) fn check_counters(&mut self, now: Instant) -> Result<(), String> {
        let grace = self.cfg.cleaning_grace;
        for p in self.pools.values_mut() {
            promote(p, &self.agents, grace, now);
        }
        self.check_index()?;
        for (name, p) in &self.pools {
            let mut fresh = 0;
            let mut cleaning = 0;
            for a in p.members.iter().map(|id| &self.agents[id]) {
                match a.state {
                    AgentState::Idle if !stale_at(a, p.spec.max_age.0, now) => fresh += 1,
                    AgentState::Cleaning if !a.retire && now.duration_since(a.since) < grace => {
                        cleaning += 1
                    }
                    _ => {}
                }
            }
            if (fresh, cleaning) != (p.fresh.len(), p.cleaning.len()) {
                return Err(format!(
                    "pool {name}: indexes hold {} fresh idle and {} cleaning within the grace, a recount at now gives {fresh} and {cleaning}",
                    p.fresh.len(),
                    p.cleaning.len()
                ));
            }
        }
        Ok(())
    }
}

/// Marks a pool as touched, without allocating when it is already marked.
pub(super) fn mark_dirty(dirty: &mut BTreeSet<String>, pool: &str) {
    if !dirty.contains(pool) {
        dirty.insert(pool.to_string());
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
    pools: &mut BTreeMap<String, Pool>,
    agents: &HashMap<AgentId, Agent>,
    cache: &mut HashMap<String, Arc<[String]>>,
    grace: Duration,
    req: &LeaseRequest,
    now: Instant,
) -> Option<AgentId> {
    let names = matching(pools, cache, req);
    for name in names.iter() {
        if let Some(p) = pools.get_mut(name) {
            promote(p, agents, grace, now);
        }
    }
    let mut best: Option<(bool, &IdleKey)> = None;
    for name in names.iter() {
        let Some(p) = pools.get(name) else { continue };
        if p.removed {
            continue;
        }
        let cand = match p.fresh.last() {
            Some(k) => Some((true, k)),
            None => p.stale.last().map(|k| (false, k)),
        };
        if let Some(c) = cand
            && best.is_none_or(|b| c > b)
        {
            best = Some(c);
        }
    }
    best.map(|(_, key)| key.1.0.clone())
}
