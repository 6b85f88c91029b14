//! Offline arena planning: every activation gets an offset in one arena, with buffers whose
//! lifetimes overlap kept apart, and reshapes sharing their input's bytes.

use edgefold_runtime::format::{MAX_SYMBOLS, SECTION_ALIGN};
use edgefold_runtime::ops::Op;

use crate::ir::{Graph, ValueId};

/// Arena placement of the graph's activations.
#[derive(Clone, Debug, PartialEq)]
pub struct ArenaPlan {
    /// Arena offset of each value (`None` for constants).
    pub offsets: Vec<Option<u64>>,
    /// Byte length of each value at the symbols' maximum values (0 for constants).
    pub sizes: Vec<u64>,
    /// Total arena bytes.
    pub arena_bytes: u64,
}

/// Bytes of a value at the symbols' maximum values.
pub fn max_bytes(graph: &Graph, id: ValueId) -> u64 {
    let mut symbols = [1u64; MAX_SYMBOLS];
    for (s, sym) in symbols.iter_mut().zip(&graph.symbols) {
        *s = sym.max as u64;
    }
    let v = &graph.values[id];
    let count: u64 = v.shape.iter().map(|d| d.eval(&symbols).unwrap_or(u64::MAX)).product();
    v.dtype.bytes_for(count).unwrap_or(u64::MAX)
}

fn align(v: u64) -> u64 {
    v.div_ceil(SECTION_ALIGN as u64) * SECTION_ALIGN as u64
}

/// Plans the arena: greedy placement by decreasing size, each buffer at the lowest offset that
/// does not collide with an already placed buffer whose lifetime overlaps.
pub fn plan_arena(graph: &Graph) -> ArenaPlan {
    let n = graph.values.len();
    let steps = graph.nodes.len();
    // Storage root of each value: a reshape's output shares its input's bytes.
    let mut root: Vec<ValueId> = (0..n).collect();
    for node in &graph.nodes {
        if let (Op::Reshape, Some(Some(x))) = (node.op, node.inputs.first()) {
            if !graph.is_const(*x) && !graph.inputs.contains(&node.outputs[0]) {
                root[node.outputs[0]] = root[*x];
            }
        }
    }
    // Lifetime of each root: [first write, last read], in node steps.
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    let touch = |v: ValueId, t: usize, first: &mut Vec<usize>, last: &mut Vec<usize>| {
        let r = root[v];
        first[r] = first[r].min(t);
        last[r] = last[r].max(t);
    };
    for &i in &graph.inputs {
        touch(i, 0, &mut first, &mut last);
        touch(i, steps, &mut first, &mut last);
    }
    for (t, node) in graph.nodes.iter().enumerate() {
        for &i in node.inputs.iter().flatten() {
            if !graph.is_const(i) {
                touch(i, t, &mut first, &mut last);
            }
        }
        for &o in &node.outputs {
            touch(o, t, &mut first, &mut last);
        }
    }
    for &o in &graph.outputs {
        touch(o, steps, &mut first, &mut last);
    }

    let sizes: Vec<u64> =
        (0..n).map(|v| if graph.is_const(v) { 0 } else { max_bytes(graph, v) }).collect();
    let mut roots: Vec<ValueId> =
        (0..n).filter(|&v| root[v] == v && !graph.is_const(v) && first[v] != usize::MAX).collect();
    roots.sort_by_key(|&v| (std::cmp::Reverse(sizes[v]), v));

    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new(); // offset, end, first, last
    let mut offsets = vec![None; n];
    let mut arena = 0u64;
    for &v in &roots {
        let size = align(sizes[v].max(1));
        let mut conflicts: Vec<(u64, u64)> = placed
            .iter()
            .filter(|p| p.2 <= last[v] && first[v] <= p.3)
            .map(|p| (p.0, p.1))
            .collect();
        conflicts.sort_unstable();
        let mut offset = 0u64;
        for (start, end) in conflicts {
            if offset + size <= start {
                break;
            }
            offset = offset.max(align(end));
        }
        placed.push((offset, offset + size, first[v], last[v]));
        offsets[v] = Some(offset);
        arena = arena.max(offset + size);
    }
    for v in 0..n {
        if !graph.is_const(v) && root[v] != v {
            offsets[v] = offsets[root[v]];
        }
    }
    ArenaPlan { offsets, sizes, arena_bytes: arena }
}
