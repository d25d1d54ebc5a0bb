//! Name resolution: how a checkpoint tensor name becomes a destination parameter name.
//!
//! A model states its rules as data ([`Rules`]); resolving a name is a fixed pipeline of
//! constant-time steps, so planning is linear in the number of tensors:
//! 1. explicit renames (from a model's Python hooks, if it has custom ones);
//! 2. prefix rewrites (`language_model.model.` -> `model.`, ...), first match wins;
//! 3. declared ignores (vision tower, projector, `rotary_emb.inv_freq`, ...), the declared
//!    MTP layers (`num_hidden_layers <= i < num_hidden_layers + num_nextn_predict_layers`);
//!    a layer beyond those has no place in the model and is reported unused (an error
//!    when strict), never dropped silently;
//! 4. scale remaps (`k_proj.k_scale` -> `attn.k_scale`, ...);
//! 5. shared-expert fusion (`mlp.shared_experts.` -> `mlp.experts.{n_routed}.`);
//! 6. expert params: the `experts.{e}.{proj}.` fragment is cut out of the name and looked
//!    up in a hash map (never a scan of the mapping);
//! 7. stacked params (`gate_proj` -> `gate_up_proj` shard 0, ...): a short list.

use std::collections::HashMap;

/// How a destination parameter is split across tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpSplit {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Split on the output dim (dim 0 of the stored tensor).
    Column,
    /// Split on the input dim (dim 1 of the stored tensor).
    Row,
}

/// A declared reason to skip checkpoint tensors.
#[derive(Debug, Clone)]
pub struct IgnoreRule {
    /// Matches names starting with this, checked on the name as stored and again after
    /// the prefix rewrite (so `vision_tower.` and `model.layers.` forms both match).
    pub prefix: Option<String>,
    /// Matches names containing this.
    pub contains: Option<String>,
    pub reason: String,
}

impl IgnoreRule {
    fn matches(&self, name: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| name.starts_with(p))
            && self.contains.as_deref().is_none_or(|c| name.contains(c))
            && (self.prefix.is_some() || self.contains.is_some())
    }
}

/// `(param_fragment, ckpt_fragment, shard order)`: `ckpt_fragment` in a name is replaced by
/// `param_fragment`, and the tensor becomes shard `order` of a stacked parameter
/// (concatenated along dim 0 in shard order).
#[derive(Debug, Clone)]
pub struct StackedRule {
    pub param: String,
    pub ckpt: String,
    pub order: u32,
}

/// One checkpoint tensor that feeds several parameters (the inverse of stacking): a
/// resolved name containing `fragment` with no parameter of its own is cut along dim 0
/// into `parts.len()` equal row blocks, block `k` going to the name with `fragment`
/// replaced by `parts[k].0`. When `parts[k].1` is a head count `h > 0`, the block's rows
/// are reordered within each of its `h` heads from interleaved pairs `(x0, x1), (x2, x3),
/// ...` to halves `x0, x2, ..., x1, x3, ...` (a rotate-half RoPE layout, as transformers
/// holds Kimi-K2.5's vision q / k), expressed as ops over the rows taken two at a time.
#[derive(Debug, Clone)]
pub struct UnfuseRule {
    pub fragment: String,
    pub parts: Vec<(String, u32)>,
}

/// One expert fragment: `experts.{expert}.{proj}.` -> `param_prefix`, as shard `order`
/// (w1 = 0 and w3 = 1 of w13, w2 = 0 of w2) with the given TP split.
#[derive(Debug, Clone)]
pub struct ExpertRule {
    pub param_prefix: String,
    pub expert: u32,
    pub order: u32,
    pub split: TpSplit,
}

#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Exact renames applied first (`None` skips the tensor, with the reason "renamed away").
    pub renames: HashMap<String, Option<String>>,
    pub rewrites: Vec<(String, String)>,
    pub ignore: Vec<IgnoreRule>,
    pub num_hidden_layers: Option<u32>,
    /// DeepSeek MTP layers stored after the last decoder layer; skipped by a named rule.
    pub num_nextn_predict_layers: u32,
    /// Suffix replacements, e.g. `(".k_proj.k_scale", ".attn.k_scale")`.
    pub scale_remaps: Vec<(String, String)>,
    /// When set, `mlp.shared_experts.` becomes `mlp.experts.{slot}.` (the fused slot).
    pub fused_shared_slot: Option<u32>,
    pub stacked: Vec<StackedRule>,
    /// `experts.{e}.{proj}.` fragment -> rule.
    pub experts: HashMap<String, ExpertRule>,
    /// Destination-name fragment -> TP split (first match in order wins; default replicated).
    pub tp_rules: Vec<(String, TpSplit)>,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub ep_rank: u32,
    pub ep_size: u32,
    /// The tensor-parallel slice of expert parameters: `tp_size / ep_size` ways under the
    /// engines' convention (EP inside the TP group), `tp_size` ways with independent axes.
    /// `0` means "as `tp_*`".
    pub moe_tp_rank: u32,
    pub moe_tp_size: u32,
    /// Routed experts in the checkpoint (global count, without a fused shared slot).
    pub num_experts: Option<u32>,
    /// Destination name -> local rows of each shard of a stacked destination (per expert
    /// block for expert parameters), in shard order. Undeclared stacked destinations are
    /// split in equal parts.
    pub shard_rows: HashMap<String, Vec<u64>>,
    /// Checkpoint tensors cut into several parameters (e.g. a fused `wqkv`).
    pub unfused: Vec<UnfuseRule>,
}

/// What a checkpoint name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved<'r> {
    /// Skipped by a declared rule.
    Ignored(String),
    /// Belongs to an expert this expert-parallel rank does not hold.
    OtherRank,
    /// Has no place in the model by any rule (e.g. a layer beyond the config's layers):
    /// reported as unused, with the reason.
    Unplaced(String),
    /// Goes to `param` (maybe as one shard of a stacked or expert parameter).
    Param {
        param: String,
        /// Local expert slot, for expert parameters.
        expert: Option<u32>,
        /// Position among the shards stacked along dim 0 (0 when not stacked).
        order: u32,
        /// Whether `param` is stacked from several checkpoint tensors.
        stacked: bool,
        /// Split forced by an expert rule (otherwise looked up by parameter name).
        split: Option<TpSplit>,
        /// The stacked rule's parameter fragment (`gate_up_proj`, `experts.w13_`), which
        /// tells how many shards the destination stacks.
        stack_key: Option<&'r str>,
    },
}

/// `model.layers.{i}.` -> `i`, wherever it appears.
pub fn layer_index(name: &str) -> Option<u32> {
    let at = name.find("layers.")?;
    let rest = &name[at + 7..];
    let end = rest.find('.')?;
    rest[..end].parse().ok()
}

/// Finds `experts.{digits}.{word}.` in `name`: returns the byte range of the fragment.
fn expert_fragment(name: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = name[from..].find("experts.") {
        let start = from + i;
        let rest = &name[start + 8..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest.as_bytes().get(digits) == Some(&b'.') {
            let after = &rest[digits + 1..];
            if let Some(dot) = after.find('.') {
                return Some((start, start + 8 + digits + 1 + dot + 1));
            }
        }
        from = start + 8;
    }
    None
}

impl Rules {
    /// `(size, rank)` of the tensor-parallel slice for expert parameters or the others.
    pub fn tp_of(&self, expert: bool) -> (u64, u64) {
        if expert && self.moe_tp_size > 0 {
            (self.moe_tp_size as u64, self.moe_tp_rank as u64)
        } else {
            (self.tp_size.max(1) as u64, self.tp_rank as u64)
        }
    }

    /// Checks the parallel settings are a valid rank of a valid layout.
    pub fn check_parallel(&self) -> crate::error::Result<()> {
        let axes = [
            ("tp", self.tp_rank, self.tp_size.max(1)),
            ("ep", self.ep_rank, self.ep_size.max(1)),
            ("moe_tp", self.moe_tp_rank, self.moe_tp_size.max(1)),
        ];
        for (axis, rank, size) in axes {
            if rank >= size {
                return Err(crate::error::Error::InvalidArgument {
                    reason: format!("{axis}_rank={rank} is not a rank of {axis}_size={size}"),
                });
            }
        }
        Ok(())
    }

    /// The expert-parallel range `[lo, hi)` of global routed experts this rank keeps.
    pub fn expert_range(&self) -> Option<(u32, u32)> {
        let e = self.num_experts?;
        let ep = self.ep_size.max(1);
        Some((self.ep_rank * e / ep, (self.ep_rank + 1) * e / ep))
    }

    /// The TP split of a destination parameter (by the first matching fragment).
    pub fn split_of(&self, param: &str) -> TpSplit {
        self.tp_rules
            .iter()
            .find(|(frag, _)| param.contains(frag.as_str()))
            .map_or(TpSplit::Replicated, |(_, s)| *s)
    }

    /// Resolves one checkpoint name.
    pub fn resolve(&self, ckpt_name: &str) -> Resolved<'_> {
        let mut name: String = match self.renames.get(ckpt_name) {
            Some(Some(n)) => n.clone(),
            Some(None) => {
                return Resolved::Ignored("skipped by the model's mutate_weight_preload".into())
            }
            None => ckpt_name.to_owned(),
        };
        if let Some(r) = self.ignore.iter().find(|r| r.matches(&name)) {
            return Resolved::Ignored(r.reason.clone());
        }
        if let Some((from, to)) = self
            .rewrites
            .iter()
            .find(|(f, _)| name.starts_with(f.as_str()))
        {
            name = format!("{to}{}", &name[from.len()..]);
        }
        if let Some(r) = self.ignore.iter().find(|r| r.matches(&name)) {
            return Resolved::Ignored(r.reason.clone());
        }
        if let (Some(n), Some(i)) = (self.num_hidden_layers, layer_index(&name)) {
            let mtp = self.num_nextn_predict_layers;
            if i >= n && i - n < mtp {
                return Resolved::Ignored(format!(
                    "MTP layer (num_nextn_predict_layers={mtp} after num_hidden_layers={n}): not loaded"
                ));
            }
            if i >= n {
                return Resolved::Unplaced(format!(
                    "layer {i} is beyond the model's layers (num_hidden_layers={n}, num_nextn_predict_layers={mtp})"
                ));
            }
        }
        if let Some((from, to)) = self
            .scale_remaps
            .iter()
            .find(|(f, _)| name.ends_with(f.as_str()))
        {
            name = format!("{}{to}", &name[..name.len() - from.len()]);
        }
        if let Some(slot) = self.fused_shared_slot {
            if let Some(i) = name.find(".mlp.shared_experts.") {
                name = format!("{}.mlp.experts.{slot}.{}", &name[..i], &name[i + 20..]);
            }
        }
        if let Some((a, b)) = expert_fragment(&name) {
            if let Some(rule) = self.experts.get(&name[a..b]) {
                let mut local = rule.expert;
                if let Some((lo, hi)) = self.expert_range() {
                    let fused = self.fused_shared_slot == Some(rule.expert);
                    if fused {
                        local = hi - lo; // the fused shared expert sits after this rank's experts
                    } else if rule.expert < lo || rule.expert >= hi {
                        return Resolved::OtherRank;
                    } else {
                        local = rule.expert - lo;
                    }
                }
                let param = format!("{}{}{}", &name[..a], rule.param_prefix, &name[b..]);
                return Resolved::Param {
                    param,
                    expert: Some(local),
                    order: rule.order,
                    stacked: true,
                    split: Some(rule.split),
                    stack_key: Some(rule.param_prefix.as_str()),
                };
            }
        }
        for rule in &self.stacked {
            if let Some(i) = name.find(rule.ckpt.as_str()) {
                let param = format!(
                    "{}{}{}",
                    &name[..i],
                    rule.param,
                    &name[i + rule.ckpt.len()..]
                );
                return Resolved::Param {
                    param,
                    expert: None,
                    order: rule.order,
                    stacked: true,
                    split: None,
                    stack_key: Some(rule.param.as_str()),
                };
            }
        }
        Resolved::Param {
            param: name,
            expert: None,
            order: 0,
            stacked: false,
            split: None,
            stack_key: None,
        }
    }

    /// How many shards each stacked parameter fragment has (`gate_up_proj` -> 2,
    /// `experts.w13_` -> 2, `experts.w2_` -> 1): counted once per plan.
    pub fn shard_counts(&self) -> HashMap<&str, u32, foldhash::fast::RandomState> {
        let mut out = HashMap::with_hasher(foldhash::fast::RandomState::default());
        for (key, order) in self
            .stacked
            .iter()
            .map(|r| (r.param.as_str(), r.order))
            .chain(
                self.experts
                    .values()
                    .map(|r| (r.param_prefix.as_str(), r.order)),
            )
        {
            let n = out.entry(key).or_insert(0);
            *n = (*n).max(order + 1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kimi_rules() -> Rules {
        let mut r = Rules {
            rewrites: vec![
                ("language_model.model.".into(), "model.".into()),
                ("language_model.layers.".into(), "model.layers.".into()),
                ("language_model.".into(), "".into()),
            ],
            ignore: vec![
                IgnoreRule {
                    prefix: Some("vision_tower.".into()),
                    contains: None,
                    reason: "vision".into(),
                },
                IgnoreRule {
                    prefix: None,
                    contains: Some("rotary_emb.inv_freq".into()),
                    reason: "rope".into(),
                },
            ],
            num_hidden_layers: Some(3),
            scale_remaps: vec![(".k_proj.k_scale".into(), ".attn.k_scale".into())],
            stacked: vec![
                StackedRule {
                    param: "gate_up_proj".into(),
                    ckpt: "gate_proj".into(),
                    order: 0,
                },
                StackedRule {
                    param: "gate_up_proj".into(),
                    ckpt: "up_proj".into(),
                    order: 1,
                },
            ],
            num_experts: Some(8),
            tp_size: 1,
            ep_size: 2,
            ep_rank: 1,
            ..Rules::default()
        };
        for e in 0..9 {
            for (proj, prefix, order, split) in [
                ("gate_proj", "experts.w13_", 0, TpSplit::Column),
                ("up_proj", "experts.w13_", 1, TpSplit::Column),
                ("down_proj", "experts.w2_", 0, TpSplit::Row),
            ] {
                r.experts.insert(
                    format!("experts.{e}.{proj}."),
                    ExpertRule {
                        param_prefix: prefix.into(),
                        expert: e,
                        order,
                        split,
                    },
                );
            }
        }
        r
    }

    #[test]
    fn resolves_the_kimi_names() {
        let r = kimi_rules();
        assert!(matches!(
            r.resolve("vision_tower.patch_embed.proj.weight"),
            Resolved::Ignored(_)
        ));
        assert!(matches!(
            r.resolve("language_model.model.rotary_emb.inv_freq"),
            Resolved::Ignored(_)
        ));
        assert!(matches!(
            r.resolve("language_model.model.layers.3.mlp.gate.weight"),
            Resolved::Unplaced(_)
        ));
        assert_eq!(
            r.resolve("language_model.model.layers.1.mlp.experts.2.up_proj.weight"),
            Resolved::OtherRank
        );
        match r.resolve("language_model.layers.1.mlp.experts.6.down_proj.weight_packed") {
            Resolved::Param {
                param,
                expert,
                order,
                ..
            } => {
                assert_eq!(param, "model.layers.1.mlp.experts.w2_weight_packed");
                assert_eq!((expert, order), (Some(2), 0));
            }
            other => panic!("{other:?}"),
        }
        match r.resolve("language_model.model.layers.0.mlp.up_proj.weight") {
            Resolved::Param {
                param,
                order,
                stacked,
                ..
            } => {
                assert_eq!(
                    (param.as_str(), order, stacked),
                    ("model.layers.0.mlp.gate_up_proj.weight", 1, true)
                );
            }
            other => panic!("{other:?}"),
        }
        match r.resolve("language_model.lm_head.weight") {
            Resolved::Param { param, stacked, .. } => {
                assert_eq!((param.as_str(), stacked), ("lm_head.weight", false))
            }
            other => panic!("{other:?}"),
        }
        match r.resolve("language_model.model.layers.1.self_attn.k_proj.k_scale") {
            Resolved::Param { param, .. } => {
                assert_eq!(param, "model.layers.1.self_attn.attn.k_scale")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fused_shared_expert_is_on_every_rank_after_the_local_experts() {
        let mut r = kimi_rules();
        r.fused_shared_slot = Some(8);
        for rank in 0..2 {
            r.ep_rank = rank;
            match r.resolve("model.layers.1.mlp.shared_experts.gate_proj.weight") {
                Resolved::Param { param, expert, .. } => {
                    assert_eq!(param, "model.layers.1.mlp.experts.w13_weight");
                    assert_eq!(expert, Some(4));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn only_declared_mtp_layers_are_skipped() {
        let mut r = kimi_rules();
        r.num_nextn_predict_layers = 1;
        assert!(matches!(
            r.resolve("model.layers.3.enorm.weight"),
            Resolved::Ignored(reason) if reason.contains("MTP")
        ));
        assert!(matches!(
            r.resolve("model.layers.4.enorm.weight"),
            Resolved::Unplaced(reason) if reason.contains("layer 4")
        ));
        let counts = r.shard_counts();
        assert_eq!(counts["experts.w13_"], 2);
        assert_eq!(counts["experts.w2_"], 1);
        assert_eq!(counts["gate_up_proj"], 2);
    }

    #[test]
    fn fragments_and_layers() {
        assert_eq!(
            layer_index("language_model.model.layers.17.mlp.x"),
            Some(17)
        );
        assert_eq!(layer_index("model.norm.weight"), None);
        let n = "model.layers.1.mlp.experts.12.down_proj.weight";
        let (a, b) = expert_fragment(n).unwrap();
        assert_eq!(&n[a..b], "experts.12.down_proj.");
        assert_eq!(
            expert_fragment("model.layers.1.mlp.shared_experts.down_proj.weight"),
            None
        );
        assert_eq!(expert_fragment("experts.w13_weight"), None);
    }
}
