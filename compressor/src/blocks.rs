//! Finding the repeated blocks (transformer layers) of a graph and the residual-stream tensors
//! between them, so blocks can be measured, removed or merged.
//!
//! Blocks are found from names: exporters keep the layer index in node or weight names
//! (`encoder.layer.3.attention...`, `/layers.12/mlp/...`, `blk.7.ffn_up`). A node belongs to block
//! `i` when its name or the name of one of its constant inputs has such an index. A block's input
//! is the activation of the block output's shape that it reads from outside; its output is the
//! activation of that shape read outside the block.

use std::collections::BTreeMap;

use crate::ir::{Graph, ValueId};

/// One repeated block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Layer index from the names.
    pub index: usize,
    /// Nodes of the block, in execution order.
    pub nodes: Vec<usize>,
    /// Residual-stream tensor entering the block.
    pub input: ValueId,
    /// Residual-stream tensor leaving the block.
    pub output: ValueId,
}

/// Extracts a layer index from a name, for the naming schemes exporters use.
pub fn layer_index(name: &str) -> Option<usize> {
    const KEYS: [&str; 6] = ["layer", "layers", "blk", "block", "blocks", "h"];
    let parts: Vec<&str> = name.split(['.', '/', '_', ':']).filter(|p| !p.is_empty()).collect();
    for window in parts.windows(2) {
        if KEYS.contains(&window[0].to_ascii_lowercase().as_str()) {
            if let Ok(i) = window[1].parse::<usize>() {
                return Some(i);
            }
        }
    }
    // Forms like "layer3" or "blk12".
    for part in &parts {
        for key in ["layer", "blk", "block"] {
            if let Some(rest) = part.to_ascii_lowercase().strip_prefix(key) {
                if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                    return rest.parse().ok();
                }
            }
        }
    }
    None
}

fn node_layer(graph: &Graph, n: usize) -> Option<usize> {
    let node = &graph.nodes[n];
    layer_index(&node.name).or_else(|| {
        node.inputs
            .iter()
            .flatten()
            .filter(|&&v| graph.is_const(v))
            .find_map(|&v| layer_index(&graph.values[v].name))
    })
}

/// Finds the blocks of a graph; empty when no repeated, named structure with a clean residual
/// interface is found.
pub fn find_blocks(graph: &Graph) -> Vec<Block> {
    let producers = graph.producers();
    let consumers = graph.consumers();
    let mut layer: Vec<Option<usize>> =
        (0..graph.nodes.len()).map(|n| node_layer(graph, n)).collect();
    // Unnamed nodes that lie on a path between two nodes of one layer belong to that layer.
    let named = layer.clone();
    let layers: std::collections::BTreeSet<usize> = named.iter().flatten().copied().collect();
    for &l in &layers {
        let seeds: Vec<usize> = (0..graph.nodes.len()).filter(|&n| named[n] == Some(l)).collect();
        let forward = reach(graph, &seeds, &consumers, &producers, true);
        let backward = reach(graph, &seeds, &consumers, &producers, false);
        for n in 0..graph.nodes.len() {
            if named[n].is_none() && forward[n] && backward[n] {
                layer[n] = Some(l);
            }
        }
    }
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (n, l) in layer.iter().enumerate() {
        if let Some(l) = l {
            by_layer.entry(*l).or_default().push(n);
        }
    }
    if by_layer.len() < 2 {
        return Vec::new();
    }
    let mut blocks = Vec::new();
    for (&index, nodes) in &by_layer {
        let inside = |n: usize| nodes.binary_search(&n).is_ok();
        // Activations produced inside and read outside (or graph outputs).
        let mut outs: Vec<ValueId> = Vec::new();
        for &n in nodes {
            for &o in &graph.nodes[n].outputs {
                let read_outside =
                    consumers[o].iter().any(|&c| !inside(c)) || graph.outputs.contains(&o);
                if read_outside {
                    outs.push(o);
                }
            }
        }
        let [output] = outs.as_slice() else {
            log::debug!("layer {index}: {} values leave the block; not a clean block", outs.len());
            return Vec::new();
        };
        let shape = &graph.values[*output].shape;
        let mut ins: Vec<ValueId> = Vec::new();
        for &n in nodes {
            for &i in graph.nodes[n].inputs.iter().flatten() {
                let from_outside = !graph.is_const(i) && producers[i].is_none_or(|p| !inside(p));
                if from_outside && &graph.values[i].shape == shape && !ins.contains(&i) {
                    ins.push(i);
                }
            }
        }
        let [input] = ins.as_slice() else {
            log::debug!(
                "layer {index}: {} candidate residual inputs; not a clean block",
                ins.len()
            );
            return Vec::new();
        };
        blocks.push(Block { index, nodes: nodes.clone(), input: *input, output: *output });
    }
    let chained = blocks.windows(2).all(|w| w[1].input == w[0].output);
    if !chained {
        log::debug!("blocks do not form a chain through the residual stream");
        return Vec::new();
    }
    blocks
}

/// Nodes reachable from `seeds` through data edges, forward (to consumers) or backward.
fn reach(
    graph: &Graph,
    seeds: &[usize],
    consumers: &[Vec<usize>],
    producers: &[Option<usize>],
    forward: bool,
) -> Vec<bool> {
    let mut seen = vec![false; graph.nodes.len()];
    let mut stack: Vec<usize> = seeds.to_vec();
    while let Some(n) = stack.pop() {
        let next: Vec<usize> = if forward {
            graph.nodes[n].outputs.iter().flat_map(|&o| consumers[o].iter().copied()).collect()
        } else {
            graph.nodes[n].inputs.iter().flatten().filter_map(|&i| producers[i]).collect()
        };
        for m in next {
            if !seen[m] {
                seen[m] = true;
                stack.push(m);
            }
        }
    }
    seen
}

/// Removes block `b` by routing its input to every reader of its output.
pub fn drop_block(graph: &mut Graph, block: &Block) {
    reroute(graph, block.output, block.input);
}

/// Makes every reader of `value` (nodes and graph outputs) read `replacement` instead, then prunes
/// the nodes and values no longer read. Value ids change: find blocks again afterwards.
pub fn reroute(graph: &mut Graph, value: ValueId, replacement: ValueId) {
    for node in &mut graph.nodes {
        for i in node.inputs.iter_mut().flatten() {
            if *i == value {
                *i = replacement;
            }
        }
    }
    for o in &mut graph.outputs {
        if *o == value {
            *o = replacement;
        }
    }
    graph.prune();
}

#[cfg(test)]
mod tests {
    use super::layer_index;

    #[test]
    fn layer_index_naming_schemes() {
        assert_eq!(layer_index("encoder.layer.3.attention.self.query.wT"), Some(3));
        assert_eq!(layer_index("/model/model.0/auto_model/encoder/layer.2/output/Add"), Some(2));
        assert_eq!(layer_index("model.layers.17.mlp.up_proj.weight"), Some(17));
        assert_eq!(layer_index("blk.29.ffn_down.weight"), Some(29));
        assert_eq!(layer_index("transformer.h.5.attn"), Some(5));
        assert_eq!(layer_index("layer12_conv"), Some(12));
        assert_eq!(layer_index("embeddings.LayerNorm.w"), None);
        assert_eq!(layer_index("onnx::MatMul_470"), None);
    }
}
