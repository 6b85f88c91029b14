//! Offline arena planning: every activation gets an offset in one arena, with buffers whose
//! lifetimes overlap kept apart, reshapes sharing their input's bytes, and ops that the runtime
//! can compute in place writing over their input.

use edgefold_runtime::format::{MAX_SYMBOLS, SECTION_ALIGN};
use edgefold_runtime::kernels::conv::in_place_scratch_len;
use edgefold_runtime::ops::Op;

use crate::ir::{Graph, Node, ValueId};

/// Bytes of input pixels that the scratch of a pointwise convolution in place holds at most
/// (but always one pixel). Larger blocks turn each weight into f32 fewer times and run longer
/// inner loops: with 64 channels, 4 KiB is a block of 16 pixels, and keyword spotting then runs
/// 3 % more instructions on a Cortex-M4F than with separate buffers (10 % with 2 KiB).
pub const POINTWISE_SCRATCH_BYTES: u64 = 4096;

/// Arena placement of the graph's activations.
#[derive(Clone, Debug, PartialEq)]
pub struct ArenaPlan {
    /// Arena offset of each value (`None` for constants).
    pub offsets: Vec<Option<u64>>,
    /// Byte length of each value at the symbols' maximum values (0 for constants).
    pub sizes: Vec<u64>,
    /// For each node, whether it writes its output over its input 0.
    pub in_place: Vec<bool>,
    /// For each node, the scratch of a convolution that runs in place.
    pub scratch: Vec<Option<Scratch>>,
    /// Total arena bytes: the largest end of any placed region.
    pub arena_bytes: u64,
}

/// Working memory of one op, placed in the arena for the op's step only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scratch {
    /// Arena offset.
    pub offset: u64,
    /// Length in f32 elements.
    pub elements: u64,
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

/// Scratch f32 elements that `node` needs to run in place (0 for element-wise ops), or `None`
/// when the runtime cannot compute it in place. The rules match the runtime's checks at open:
/// input 0 has the output's type and shape, and the op is element-wise, a 1x1 convolution
/// without padding or a depthwise convolution, both with stride 1.
pub fn in_place_scratch(graph: &Graph, node: &Node) -> Option<u64> {
    let x = (*node.inputs.first()?)?;
    let &[y] = node.outputs.as_slice() else { return None };
    let (xv, yv) = (&graph.values[x], &graph.values[y]);
    if graph.is_const(x) || xv.dtype != yv.dtype || xv.shape != yv.shape {
        return None;
    }
    let (window, groups) = match node.op {
        Op::Unary { .. } | Op::Binary(_) => return Some(0),
        Op::Conv2d { window, groups, .. } => (window, groups),
        _ => return None,
    };
    let [_, channels, height, width] = xv.shape.as_slice() else { return None };
    let extents = [channels, height, width].map(|d| d.as_constant().map(|c| c as usize));
    let [Some(channels), Some(height), Some(width)] = extents else { return None };
    if window.strides != [1, 1] {
        return None;
    }
    if window.kernel == [1, 1] {
        if window.pads != [0; 4] {
            return None;
        }
        let pixels =
            (POINTWISE_SCRATCH_BYTES / 4 / channels as u64).clamp(1, (height * width) as u64);
        return Some(pixels * channels as u64);
    }
    if groups as usize != channels {
        return None;
    }
    in_place_scratch_len(&window, channels, [height, width]).map(|n| n as u64)
}

/// One region to place: a group of values that share bytes, or an op's scratch.
struct Region {
    bytes: u64,
    first: usize,
    last: usize,
    /// Placement order among regions of equal size: values first, by index, then scratches.
    order: (bool, usize),
}

/// Choices of the arena planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Let ops that the runtime can compute in place write over their input 0.
    pub in_place: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { in_place: true }
    }
}

/// Plans the arena with the default options: see [`plan_arena_with`].
pub fn plan_arena(graph: &Graph) -> ArenaPlan {
    plan_arena_with(graph, &PlanOptions::default())
}

/// Plans the arena: greedy placement by decreasing size, each buffer at the lowest offset that
/// does not collide with an already placed buffer whose lifetime overlaps.
pub fn plan_arena_with(graph: &Graph, options: &PlanOptions) -> ArenaPlan {
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

    let (in_place, scratch_elements) = match options.in_place {
        true => share_in_place(graph, &mut root, &mut first, &mut last),
        false => (vec![false; steps], vec![0; steps]),
    };
    let sizes: Vec<u64> =
        (0..n).map(|v| if graph.is_const(v) { 0 } else { max_bytes(graph, v) }).collect();
    let mut group_bytes = vec![0u64; n];
    for v in (0..n).filter(|&v| !graph.is_const(v)) {
        group_bytes[root[v]] = group_bytes[root[v]].max(sizes[v]);
    }

    let mut regions: Vec<Region> = (0..n)
        .filter(|&v| root[v] == v && !graph.is_const(v) && first[v] != usize::MAX)
        .map(|v| Region {
            bytes: group_bytes[v],
            first: first[v],
            last: last[v],
            order: (false, v),
        })
        .collect();
    let scratch_nodes: Vec<usize> = (0..steps).filter(|&t| scratch_elements[t] > 0).collect();
    regions.extend(scratch_nodes.iter().map(|&t| Region {
        bytes: 4 * scratch_elements[t],
        first: t,
        last: t,
        order: (true, t),
    }));
    let (offsets_by_region, arena_bytes) = place(&mut regions);

    let mut offsets = vec![None; n];
    let mut scratch = vec![None; steps];
    for (region, offset) in regions.iter().zip(offsets_by_region) {
        match region.order {
            (false, v) => offsets[v] = Some(offset),
            (true, t) => scratch[t] = Some(Scratch { offset, elements: scratch_elements[t] }),
        }
    }
    for v in 0..n {
        if !graph.is_const(v) && root[v] != v {
            offsets[v] = offsets[root[v]];
        }
    }
    ArenaPlan { offsets, sizes, in_place, scratch, arena_bytes }
}

/// Lets each op that the runtime can compute in place share its input 0's region when no later
/// op reads that region and no other input of the op lies in it. Graph inputs and outputs are
/// live to the end, so they are never overwritten. Merges the output's group into the input's
/// and returns, per node, whether it runs in place and its scratch elements (0 for none).
fn share_in_place(
    graph: &Graph,
    root: &mut [ValueId],
    first: &mut [usize],
    last: &mut [usize],
) -> (Vec<bool>, Vec<u64>) {
    let steps = graph.nodes.len();
    let mut in_place = vec![false; steps];
    let mut scratch = vec![0u64; steps];
    for (t, node) in graph.nodes.iter().enumerate() {
        let Some(elements) = in_place_scratch(graph, node) else { continue };
        let (Some(Some(x)), Some(&y)) = (node.inputs.first(), node.outputs.first()) else {
            continue;
        };
        let (rx, ry) = (root[*x], root[y]);
        let read_again = last[rx] != t;
        let shared = node.inputs[1..].iter().flatten().any(|&i| root[i] == rx);
        if rx == ry || read_again || shared || graph.inputs.contains(&y) {
            continue;
        }
        for r in root.iter_mut().filter(|r| **r == ry) {
            *r = rx;
        }
        last[rx] = last[rx].max(last[ry]);
        first[ry] = usize::MAX;
        in_place[t] = true;
        scratch[t] = elements;
    }
    (in_place, scratch)
}

/// Places regions by decreasing size (ties in `order`), each by a first-fit scan over the
/// placed regions whose lifetimes overlap it. Returns each region's offset (in the order of
/// `regions` as sorted here) and the largest end of any region.
fn place(regions: &mut [Region]) -> (Vec<u64>, u64) {
    regions.sort_by_key(|r| (std::cmp::Reverse(r.bytes), r.order));
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new(); // offset, end, first, last
    let mut offsets = Vec::with_capacity(regions.len());
    let mut arena = 0u64;
    for r in regions.iter() {
        let size = align(r.bytes.max(1));
        let mut conflicts: Vec<(u64, u64)> =
            placed.iter().filter(|p| p.2 <= r.last && r.first <= p.3).map(|p| (p.0, p.1)).collect();
        conflicts.sort_unstable();
        let mut offset = 0u64;
        for (start, end) in conflicts {
            if offset + size <= start {
                break;
            }
            offset = offset.max(end);
        }
        placed.push((offset, offset + size, r.first, r.last));
        offsets.push(offset);
        // The arena ends where the last byte of a region is, not at its aligned end, so the
        // stated size is the bytes that a run at the symbols' maximums really touches.
        arena = arena.max(offset + r.bytes);
    }
    (offsets, arena)
}
