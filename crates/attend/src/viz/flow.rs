//! Maximum flow (Dinic's algorithm) on the layered graph of attention flow: `(L + 1)·T` nodes, an edge from each
//! position after layer `l` to each position before it, capacities from the residual-augmented attention.

use std::collections::VecDeque;

/// Residual capacities below this count as zero (the capacities are attention weights in f32).
const EPS: f64 = 1e-12;

#[derive(Clone, Debug)]
struct Edge {
    to: usize,
    cap: f64,
    /// Index of the reverse edge in `edges`.
    rev: usize,
}

/// The graph with its capacities; each [`Network::max_flow`] runs on a fresh copy of them.
#[derive(Clone, Debug)]
pub(crate) struct Network {
    adj: Vec<Vec<usize>>,
    edges: Vec<Edge>,
}

impl Network {
    /// Node `l·T + i` is position `i` after layer `l` (layer 0: the input tokens); `layers[l − 1]` `(T, T)` holds the
    /// capacities of the edges from layer `l` down to layer `l − 1`.
    pub fn layered(layers: &[Vec<f32>], t: usize) -> Self {
        let n = (layers.len() + 1) * t;
        let mut g = Self { adj: vec![vec![]; n], edges: vec![] };
        for (l, m) in layers.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    let c = m[i * t + j] as f64;
                    if c > 0.0 {
                        g.add((l + 1) * t + i, l * t + j, c);
                    }
                }
            }
        }
        g
    }

    fn add(&mut self, from: usize, to: usize, cap: f64) {
        let k = self.edges.len();
        self.edges.push(Edge { to, cap, rev: k + 1 });
        self.edges.push(Edge { to: from, cap: 0.0, rev: k });
        self.adj[from].push(k);
        self.adj[to].push(k + 1);
    }

    /// The maximum flow from `source` to `sink`.
    pub fn max_flow(&self, source: usize, sink: usize) -> f64 {
        let mut edges = self.edges.clone();
        let n = self.adj.len();
        let mut total = 0.0;
        loop {
            // Levels by breadth-first search over edges with residual capacity.
            let mut level = vec![usize::MAX; n];
            level[source] = 0;
            let mut queue = VecDeque::from([source]);
            while let Some(u) = queue.pop_front() {
                for &e in &self.adj[u] {
                    let v = edges[e].to;
                    if edges[e].cap > EPS && level[v] == usize::MAX {
                        level[v] = level[u] + 1;
                        queue.push_back(v);
                    }
                }
            }
            if level[sink] == usize::MAX {
                return total;
            }
            let mut next = vec![0usize; n];
            loop {
                let pushed = self.augment(&mut edges, &level, &mut next, source, sink, f64::INFINITY);
                if pushed <= EPS {
                    break;
                }
                total += pushed;
            }
        }
    }

    /// One blocking-flow path by depth-first search along increasing levels (`next`: the edges each node has
    /// exhausted in this phase).
    fn augment(&self, edges: &mut [Edge], level: &[usize], next: &mut [usize], u: usize, sink: usize, f: f64) -> f64 {
        if u == sink {
            return f;
        }
        while next[u] < self.adj[u].len() {
            let e = self.adj[u][next[u]];
            let (v, cap) = (edges[e].to, edges[e].cap);
            if cap > EPS && level[v] == level[u] + 1 {
                let pushed = self.augment(edges, level, next, v, sink, f.min(cap));
                if pushed > EPS {
                    edges[e].cap -= pushed;
                    let r = edges[e].rev;
                    edges[r].cap += pushed;
                    return pushed;
                }
            }
            next[u] += 1;
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_flow_of_a_small_layered_graph_is_its_min_cut() {
        // Two layers over two tokens. From node 4 (position 0 after layer 2): 4→2 (0.5), 4→3 (0.5); 2→0 (0.9),
        // 2→1 (0.1), 3→0 (0.2), 3→1 (0.8). Into input 0: min(0.5, 0.9) + min(0.5, 0.2) = 0.7.
        let l1 = vec![0.9f32, 0.1, 0.2, 0.8];
        let l2 = vec![0.5f32, 0.5, 0.5, 0.5];
        let g = Network::layered(&[l1, l2], 2);
        assert!((g.max_flow(4, 0) - 0.7).abs() < 1e-6);
        assert!((g.max_flow(4, 1) - 0.6).abs() < 1e-6);
    }
}
