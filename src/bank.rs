//! The mixed path's factor banks: where each layer's factors sit in a bank row (`manifest.model.eks`), and the
//! banks one mixed run feeds (one row per distinct expert of the batch, each sample's row index).

use std::sync::Arc;

use crate::package::{BaseLayer, EksSpec, ExpertDeltas, Factor};

/// Offsets of every decomposed layer's factors in a bank row, in `package.layers` order, checked against the
/// package's layer shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct BankLayout {
    pub width: usize,
    /// `(offset of A, offset of B)` per layer.
    offsets: Vec<(usize, usize)>,
    /// Whether the segments cover the whole row (else rows are zeroed before writing).
    dense: bool,
}

impl BankLayout {
    /// The layout of `spec`, or why it does not fit the package's layers at `rank`.
    pub fn new(spec: &EksSpec, layers: &[BaseLayer], rank: usize) -> Result<BankLayout, String> {
        if spec.rank != rank {
            return Err(format!(
                "eks rank {} differs from the package rank {rank}",
                spec.rank
            ));
        }
        let mut offsets = vec![(usize::MAX, usize::MAX); layers.len()];
        let mut covered = 0usize;
        let mut spans = Vec::with_capacity(spec.segments.len());
        for segment in &spec.segments {
            let index = layers
                .iter()
                .position(|l| l.name == segment.layer)
                .ok_or_else(|| format!("eks segment names unknown layer `{}`", segment.layer))?;
            let shape = layers[index].shape;
            let (expected, slot) = match segment.factor {
                Factor::A => (shape.a_shape(), &mut offsets[index].0),
                Factor::B => (shape.b_shape(), &mut offsets[index].1),
            };
            if [segment.rows, segment.cols] != expected {
                return Err(format!(
                    "eks segment {:?} of `{}` is {}x{}, the layer's factor is {}x{}",
                    segment.factor,
                    segment.layer,
                    segment.rows,
                    segment.cols,
                    expected[0],
                    expected[1]
                ));
            }
            if *slot != usize::MAX {
                return Err(format!(
                    "eks segment {:?} of `{}` appears twice",
                    segment.factor, segment.layer
                ));
            }
            let len = segment.rows * segment.cols;
            let end = segment
                .offset
                .checked_add(len)
                .filter(|&end| end <= spec.bank_width)
                .ok_or_else(|| {
                    format!(
                        "eks segment {:?} of `{}` ends past the bank width {}",
                        segment.factor, segment.layer, spec.bank_width
                    )
                })?;
            *slot = segment.offset;
            covered += len;
            spans.push((segment.offset, end));
        }
        if let Some(missing) = offsets
            .iter()
            .position(|&(a, b)| a == usize::MAX || b == usize::MAX)
        {
            return Err(format!(
                "eks segments miss a factor of layer `{}`",
                layers[missing].name
            ));
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err("eks segments overlap".into());
        }
        Ok(BankLayout {
            width: spec.bank_width,
            offsets,
            dense: covered == spec.bank_width,
        })
    }

    /// Writes `deltas` into one bank row: A as stored, B multiplied by the expert's scale.
    pub fn write_row(&self, row: &mut [f32], deltas: &ExpertDeltas) {
        debug_assert_eq!(row.len(), self.width);
        if !self.dense {
            row.fill(0.0);
        }
        for (&(a_at, b_at), (a, b)) in self.offsets.iter().zip(&deltas.factors) {
            row[a_at..a_at + a.len()].copy_from_slice(a);
            for (out, &v) in row[b_at..b_at + b.len()].iter_mut().zip(b) {
                *out = v * deltas.scale;
            }
        }
    }
}

/// One sample group of a mixed run: an expert's factors, its class count, and how many images it brings.
pub struct BankJob<'a> {
    pub deltas: &'a Arc<ExpertDeltas>,
    pub classes: usize,
    pub images: usize,
}

/// The banks of one mixed run (graph inputs): a row per distinct expert of the batch, heads padded to the
/// largest class count, and each image's row. Buffers are kept between runs and overwritten.
#[derive(Debug, Default)]
pub struct RunBanks {
    pub factors: Vec<f32>,
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
    /// Bank row of every image, in batch order.
    pub rows_of_images: Vec<i64>,
    /// Distinct experts (bank rows).
    pub rows: usize,
    /// Classes of the padded heads (the output's second dim).
    pub classes: usize,
}

impl RunBanks {
    /// Fills the banks for `jobs` (in batch order); jobs of the same expert (same factors) share a row.
    pub fn fill(&mut self, layout: &BankLayout, feature_dim: usize, jobs: &[BankJob<'_>]) {
        let mut distinct: Vec<&Arc<ExpertDeltas>> = Vec::new();
        self.rows_of_images.clear();
        for job in jobs {
            let row = match distinct.iter().position(|d| Arc::ptr_eq(d, job.deltas)) {
                Some(row) => row,
                None => {
                    distinct.push(job.deltas);
                    distinct.len() - 1
                }
            };
            self.rows_of_images
                .extend(std::iter::repeat_n(row as i64, job.images));
        }
        self.rows = distinct.len();
        self.classes = jobs.iter().map(|j| j.classes).max().unwrap_or(1).max(1);
        self.factors.resize(self.rows * layout.width, 0.0);
        for (row, deltas) in self.factors.chunks_exact_mut(layout.width).zip(&distinct) {
            layout.write_row(row, deltas);
        }
        let (classes, features) = (self.classes, feature_dim);
        self.head_weight.clear();
        self.head_weight.resize(self.rows * classes * features, 0.0);
        self.head_bias.clear();
        self.head_bias.resize(self.rows * classes, 0.0);
        for (row, deltas) in distinct.iter().enumerate() {
            let weight = &deltas.head_weight;
            self.head_weight[row * classes * features..][..weight.len()].copy_from_slice(weight);
            self.head_bias[row * classes..][..deltas.head_bias.len()]
                .copy_from_slice(&deltas.head_bias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        assembly::LayerShape,
        package::{EksSegment, EksSpec},
    };

    fn layers() -> Vec<BaseLayer> {
        let shape = |cout, cin, k| LayerShape {
            out_channels: cout,
            in_channels: cin,
            kernel: k,
            rank_k: 2 * k,
        };
        vec![
            BaseLayer {
                name: "stem".into(),
                shape: shape(2, 1, 3),
                w0: vec![0.0; 18],
            },
            BaseLayer {
                name: "pw".into(),
                shape: shape(3, 2, 1),
                w0: vec![0.0; 6],
            },
        ]
    }

    fn segment(layer: &str, factor: Factor, offset: usize, rows: usize, cols: usize) -> EksSegment {
        EksSegment {
            layer: layer.into(),
            factor,
            offset,
            rows,
            cols,
        }
    }

    fn spec(segments: Vec<EksSegment>, width: usize) -> EksSpec {
        EksSpec {
            file: "student_eks.onnx".into(),
            input_name: "input".into(),
            task_input: "task_slot".into(),
            bank_input: "factor_bank".into(),
            head_weight_input: "head_weight_bank".into(),
            head_bias_input: "head_bias_bank".into(),
            output_name: "logits".into(),
            rank: 2,
            bank_width: width,
            segments,
        }
    }

    /// stem: A 6x3, B 6x6; pw: A 2x2, B 3x2 — laid out with a gap of 2 floats after the stem.
    fn gapped() -> EksSpec {
        spec(
            vec![
                segment("stem", Factor::A, 0, 6, 3),
                segment("stem", Factor::B, 18, 6, 6),
                segment("pw", Factor::A, 56, 2, 2),
                segment("pw", Factor::B, 60, 3, 2),
            ],
            66,
        )
    }

    fn deltas(seed: f32, classes: usize) -> Arc<ExpertDeltas> {
        let fill = |n: usize, k: f32| (0..n).map(|i| seed + k + i as f32).collect::<Vec<f32>>();
        Arc::new(ExpertDeltas {
            scale: 2.0,
            factors: vec![
                (fill(18, 0.0), fill(36, 100.0)),
                (fill(4, 200.0), fill(6, 300.0)),
            ],
            head_weight: fill(classes * 4, 400.0),
            head_bias: fill(classes, 500.0),
        })
    }

    #[test]
    fn rows_hold_a_as_stored_and_b_scaled_with_gaps_zeroed() {
        let layout = BankLayout::new(&gapped(), &layers(), 2).unwrap();
        let d = deltas(1.0, 2);
        let mut row = vec![7.0; layout.width];
        layout.write_row(&mut row, &d);
        assert_eq!(&row[0..18], &d.factors[0].0[..]);
        assert!(row[18..54]
            .iter()
            .zip(&d.factors[0].1)
            .all(|(r, b)| *r == 2.0 * b));
        assert_eq!(&row[54..56], &[0.0, 0.0], "the gap is zeroed");
        assert_eq!(&row[56..60], &d.factors[1].0[..]);
        assert!(row[60..66]
            .iter()
            .zip(&d.factors[1].1)
            .all(|(r, b)| *r == 2.0 * b));
    }

    #[test]
    fn layouts_that_do_not_fit_the_layers_are_refused() {
        let l = layers();
        let mut wrong_shape = gapped();
        wrong_shape.segments[2].rows = 3;
        assert!(BankLayout::new(&wrong_shape, &l, 2)
            .unwrap_err()
            .contains("2x2"));
        let mut missing = gapped();
        missing.segments.pop();
        assert!(BankLayout::new(&missing, &l, 2)
            .unwrap_err()
            .contains("miss"));
        let mut overlap = gapped();
        overlap.segments[1].offset = 10;
        assert!(BankLayout::new(&overlap, &l, 2)
            .unwrap_err()
            .contains("overlap"));
        let mut past = gapped();
        past.bank_width = 60;
        assert!(BankLayout::new(&past, &l, 2).unwrap_err().contains("past"));
        assert!(BankLayout::new(&gapped(), &l, 4)
            .unwrap_err()
            .contains("rank"));
        let mut unknown = gapped();
        unknown.segments[0].layer = "nope".into();
        assert!(BankLayout::new(&unknown, &l, 2)
            .unwrap_err()
            .contains("unknown"));
    }

    #[test]
    fn run_banks_share_rows_per_expert_and_pad_heads() {
        let layout = BankLayout::new(&gapped(), &layers(), 2).unwrap();
        let (a, b) = (deltas(1.0, 2), deltas(9.0, 5));
        let jobs = [
            BankJob {
                deltas: &a,
                classes: 2,
                images: 2,
            },
            BankJob {
                deltas: &b,
                classes: 5,
                images: 1,
            },
            BankJob {
                deltas: &a,
                classes: 2,
                images: 1,
            },
        ];
        let mut banks = RunBanks::default();
        banks.fill(&layout, 4, &jobs);
        assert_eq!(banks.rows, 2);
        assert_eq!(banks.classes, 5);
        assert_eq!(banks.rows_of_images, vec![0, 0, 1, 0]);
        assert_eq!(banks.factors.len(), 2 * layout.width);
        assert_eq!(banks.head_weight.len(), 2 * 5 * 4);
        assert_eq!(&banks.head_weight[..8], &a.head_weight[..]);
        assert!(
            banks.head_weight[8..20].iter().all(|&v| v == 0.0),
            "padded classes are zero"
        );
        assert_eq!(&banks.head_weight[20..40], &b.head_weight[..]);
        assert_eq!(
            &banks.head_bias[..5],
            &[a.head_bias[0], a.head_bias[1], 0.0, 0.0, 0.0]
        );
        // A second fill with fewer experts reuses the buffers and leaves no stale row behind.
        banks.fill(&layout, 4, &jobs[1..2]);
        assert_eq!((banks.rows, banks.classes), (1, 5));
        assert_eq!(banks.factors.len(), layout.width);
        assert_eq!(banks.rows_of_images, vec![0]);
    }
}
