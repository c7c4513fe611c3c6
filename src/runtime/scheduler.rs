//! Which path runs each part of a batch: the configured execution mode, and in `auto` the measured cost of each
//! path (merged: an assembled expert per run; mixed: every expert of the batch in one run of the mixed graph).

use crate::config::Execution;

/// The path one ONNX Runtime run took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionPath {
    /// One assembled expert (`W0 + dW_t` merged), on the shared or its dedicated session.
    Merged,
    /// The mixed-task graph: each image with its own expert's factors, gathered in the run.
    Mixed,
}

impl ExecutionPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Merged => "merged",
            Self::Mixed => "mixed",
        }
    }
}

/// How much a new run time moves the running estimate.
const SMOOTHING: f64 = 0.2;

/// Running estimates of each path's run time by batch size: an exponentially weighted mean per size seen,
/// interpolated between sizes. Fed by warm-up runs at start and by every run after.
#[derive(Debug, Clone)]
pub struct CostModel {
    merged: Vec<Option<f64>>,
    mixed: Vec<Option<f64>>,
}

impl CostModel {
    pub fn new(max_images: usize) -> CostModel {
        CostModel {
            merged: vec![None; max_images.max(1) + 1],
            mixed: vec![None; max_images.max(1) + 1],
        }
    }

    fn table(&self, path: ExecutionPath) -> &[Option<f64>] {
        match path {
            ExecutionPath::Merged => &self.merged,
            ExecutionPath::Mixed => &self.mixed,
        }
    }

    pub fn observe(&mut self, path: ExecutionPath, images: usize, seconds: f64) {
        let table = match path {
            ExecutionPath::Merged => &mut self.merged,
            ExecutionPath::Mixed => &mut self.mixed,
        };
        if images == 0 || images >= table.len() || !seconds.is_finite() {
            return;
        }
        let slot = &mut table[images];
        *slot = Some(match *slot {
            Some(old) => old + SMOOTHING * (seconds - old),
            None => seconds,
        });
    }

    /// Estimated seconds of one run of `images` on `path`: measured, or interpolated linearly between the nearest
    /// measured sizes, or scaled from the nearest one; None before any run of that path.
    pub fn estimate(&self, path: ExecutionPath, images: usize) -> Option<f64> {
        let table = self.table(path);
        let images = images.clamp(1, table.len() - 1);
        if let Some(cost) = table[images] {
            return Some(cost);
        }
        let below = (1..images).rev().find_map(|n| table[n].map(|c| (n, c)));
        let above = (images + 1..table.len()).find_map(|n| table[n].map(|c| (n, c)));
        match (below, above) {
            (Some((n0, c0)), Some((n1, c1))) => {
                Some(c0 + (c1 - c0) * (images - n0) as f64 / (n1 - n0) as f64)
            }
            (Some((n0, c0)), None) => Some(c0 * images as f64 / n0 as f64),
            (None, Some((_, c1))) => Some(c1),
            (None, None) => None,
        }
    }
}

/// One expert's share of a batch, as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub images: usize,
    /// Has an assembled form (can run merged).
    pub assembled: bool,
    /// Has factors and the package a mixed graph (can run mixed).
    pub mixable: bool,
}

/// How a batch runs: these groups merged, one run each, and these together in one mixed run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub merged: Vec<usize>,
    pub mixed: Vec<usize>,
}

/// Chooses the runs for `groups` (indices into it). `merged` runs every group merged; `mixed` every group that can
/// mix; `auto` picks, among "the k smallest assembled groups join the mixed run, the other assembled groups run
/// merged", the split with the lowest estimated total time. Groups without an assembled form always mix, groups
/// that cannot mix always run merged (the batcher only forms batches that can run).
pub fn plan(mode: Execution, groups: &[Group], costs: &CostModel) -> Plan {
    let mut plan = Plan::default();
    let mut optional = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        match (mode, g.assembled, g.mixable) {
            (_, true, false) | (Execution::Merged, true, _) => plan.merged.push(i),
            (_, _, true) if mode == Execution::Mixed || !g.assembled => plan.mixed.push(i),
            (Execution::Auto, true, true) => optional.push(i),
            // Neither form: the batcher never lets such a job in; run it mixed to get a clear error.
            _ => plan.mixed.push(i),
        }
    }
    if optional.is_empty() {
        return plan;
    }
    optional.sort_by_key(|&i| groups[i].images);
    let must_mix: usize = plan.mixed.iter().map(|&i| groups[i].images).sum();
    let total = |k: usize| -> Option<f64> {
        let mixed_images = must_mix
            + optional[..k]
                .iter()
                .map(|&i| groups[i].images)
                .sum::<usize>();
        let mut seconds = 0.0;
        if mixed_images > 0 {
            seconds += costs.estimate(ExecutionPath::Mixed, mixed_images)?;
        }
        for &i in &optional[k..] {
            seconds += costs.estimate(ExecutionPath::Merged, groups[i].images)?;
        }
        Some(seconds)
    };
    // Without estimates yet: a batch of one assembled expert runs merged, anything mixed runs as one mixed run.
    let fallback = if plan.mixed.is_empty() && optional.len() == 1 {
        0
    } else {
        optional.len()
    };
    let best = (0..=optional.len())
        .map(|k| (k, total(k)))
        .try_fold((fallback, f64::INFINITY), |best, (k, cost)| {
            cost.map(|c| if c < best.1 { (k, c) } else { best })
        })
        .map_or(fallback, |(k, _)| k);
    plan.mixed.extend_from_slice(&optional[..best]);
    plan.merged.extend_from_slice(&optional[best..]);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(merged: &[(usize, f64)], mixed: &[(usize, f64)]) -> CostModel {
        let mut model = CostModel::new(32);
        for &(n, s) in merged {
            model.observe(ExecutionPath::Merged, n, s);
        }
        for &(n, s) in mixed {
            model.observe(ExecutionPath::Mixed, n, s);
        }
        model
    }

    fn group(images: usize, assembled: bool) -> Group {
        Group {
            images,
            assembled,
            mixable: true,
        }
    }

    #[test]
    fn estimates_interpolate_between_measured_sizes_and_smooth_new_runs() {
        let mut model = costs(&[(1, 1.0), (32, 32.0)], &[]);
        assert_eq!(model.estimate(ExecutionPath::Merged, 1), Some(1.0));
        assert_eq!(model.estimate(ExecutionPath::Merged, 16), Some(16.0));
        assert_eq!(model.estimate(ExecutionPath::Mixed, 4), None);
        model.observe(ExecutionPath::Merged, 1, 2.0);
        assert!((model.estimate(ExecutionPath::Merged, 1).unwrap() - 1.2).abs() < 1e-12);
        let only_small = costs(&[(2, 2.0)], &[]);
        assert_eq!(only_small.estimate(ExecutionPath::Merged, 8), Some(8.0));
        assert_eq!(only_small.estimate(ExecutionPath::Merged, 1), Some(2.0));
        model.observe(ExecutionPath::Merged, 1, f64::NAN);
        model.observe(ExecutionPath::Merged, 99, 1.0);
        assert!((model.estimate(ExecutionPath::Merged, 1).unwrap() - 1.2).abs() < 1e-12);
    }

    #[test]
    fn fixed_modes_ignore_costs() {
        let model = costs(&[(1, 1.0)], &[(1, 100.0)]);
        let groups = [group(3, true), group(2, false)];
        assert_eq!(
            plan(Execution::Mixed, &groups, &model),
            Plan {
                merged: vec![],
                mixed: vec![0, 1]
            }
        );
        let assembled = [group(3, true), group(2, true)];
        assert_eq!(
            plan(Execution::Merged, &assembled, &model),
            Plan {
                merged: vec![0, 1],
                mixed: vec![]
            }
        );
        // A job that cannot mix (the warm-up base network) runs merged whatever the mode.
        let base = [Group {
            images: 1,
            assembled: true,
            mixable: false,
        }];
        assert_eq!(plan(Execution::Mixed, &base, &model).merged, vec![0]);
    }

    #[test]
    fn auto_runs_a_hot_expert_merged_and_a_scattered_batch_mixed() {
        // Merged runs cost 1 ms + 0.5 ms/image; a mixed run 1.2 ms + 0.6 ms/image.
        let model = costs(&[(1, 1.5), (32, 17.0)], &[(1, 1.8), (32, 20.4)]);
        let one_hot = [group(32, true)];
        assert_eq!(plan(Execution::Auto, &one_hot, &model).merged, vec![0]);
        let cold = [group(1, false), group(1, false)];
        assert_eq!(plan(Execution::Auto, &cold, &model).mixed, vec![0, 1]);
        // Eight assembled experts of 4 images: one mixed run beats eight merged runs.
        let scattered = vec![group(4, true); 8];
        let p = plan(Execution::Auto, &scattered, &model);
        assert_eq!((p.merged.len(), p.mixed.len()), (0, 8));
        // A big assembled group runs merged; the stragglers, assembled or not, join one mixed run.
        let mostly_one = [group(28, true), group(1, true), group(3, false)];
        let p = plan(Execution::Auto, &mostly_one, &model);
        assert_eq!(p.merged, vec![0]);
        assert_eq!(p.mixed, vec![2, 1]);
    }

    #[test]
    fn auto_without_estimates_prefers_merged_only_for_a_lone_assembled_expert() {
        let empty = CostModel::new(32);
        assert_eq!(
            plan(Execution::Auto, &[group(5, true)], &empty).merged,
            vec![0]
        );
        let p = plan(Execution::Auto, &[group(5, true), group(1, false)], &empty);
        assert_eq!((p.merged.len(), p.mixed.len()), (0, 2));
    }
}
