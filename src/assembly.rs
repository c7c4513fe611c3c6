//! The merge rule of FORMAT.md section 3, as pure functions: `W_t = W0 + scale * reshape(B_t @ A_t)`.

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2};

/// Shapes of one decomposed conv layer `[Cout, Cin, k, k]` and its factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: usize,
    /// Rows of A / columns of B: `r * k`.
    pub rank_k: usize,
}

impl LayerShape {
    /// `[Cout * k, r * k]`
    pub fn b_shape(&self) -> [usize; 2] {
        [self.out_channels * self.kernel, self.rank_k]
    }
    /// `[r * k, Cin * k]`
    pub fn a_shape(&self) -> [usize; 2] {
        [self.rank_k, self.in_channels * self.kernel]
    }
    /// `[Cout, Cin, k, k]`
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel,
            self.kernel,
        ]
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
}

/// Returns `W0 + scale * reshape_row_major(B @ A, [Cout, Cin, k, k])`, flat and row-major.
///
/// `(Cout*k) x (Cin*k)` has the same element count as `[Cout, Cin, k, k]`, and a row-major reshape keeps the
/// flat order, so the product is accumulated straight into a copy of W0 viewed as that matrix.
pub fn merge_layer(
    shape: LayerShape,
    w0: &[f32],
    b: &[f32],
    a: &[f32],
    scale: f32,
) -> Result<Vec<f32>, String> {
    check_sizes(shape, w0, b, a)?;
    let mut merged = w0.to_vec();
    accumulate(shape, b, a, scale, &mut merged)?;
    Ok(merged)
}

/// [`merge_layer`] written into `out` (exactly `shape.weight_len()` values; its old contents are overwritten), so an
/// evicted expert's buffer can be reused instead of faulting in fresh pages.
pub fn merge_layer_into(
    shape: LayerShape,
    w0: &[f32],
    b: &[f32],
    a: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<(), String> {
    check_sizes(shape, w0, b, a)?;
    if out.len() != w0.len() {
        return Err(format!(
            "output buffer has {} values, shape {:?} needs {}",
            out.len(),
            shape.weight_shape(),
            shape.weight_len()
        ));
    }
    out.copy_from_slice(w0);
    accumulate(shape, b, a, scale, out)
}

fn check_sizes(shape: LayerShape, w0: &[f32], b: &[f32], a: &[f32]) -> Result<(), String> {
    let [b_rows, b_cols] = shape.b_shape();
    let [a_rows, a_cols] = shape.a_shape();
    if w0.len() != shape.weight_len() {
        return Err(format!(
            "W0 has {} values, shape {:?} needs {}",
            w0.len(),
            shape.weight_shape(),
            shape.weight_len()
        ));
    }
    if b.len() != b_rows * b_cols || a.len() != a_rows * a_cols {
        return Err(format!(
            "factor sizes B {} A {} do not match B {:?} A {:?}",
            b.len(),
            a.len(),
            shape.b_shape(),
            shape.a_shape()
        ));
    }
    Ok(())
}

/// `target += scale * B @ A`, `target` viewed as the `(Cout*k) x (Cin*k)` matrix (sizes already checked).
fn accumulate(
    shape: LayerShape,
    b: &[f32],
    a: &[f32],
    scale: f32,
    target: &mut [f32],
) -> Result<(), String> {
    let [b_rows, b_cols] = shape.b_shape();
    let [a_rows, a_cols] = shape.a_shape();
    let b = ArrayView2::from_shape((b_rows, b_cols), b).map_err(|e| format!("B: {e}"))?;
    let a = ArrayView2::from_shape((a_rows, a_cols), a).map_err(|e| format!("A: {e}"))?;
    let mut target =
        ArrayViewMut2::from_shape((b_rows, a_cols), target).map_err(|e| format!("W: {e}"))?;
    general_mat_mul(scale, &b, &a, 1.0, &mut target);
    Ok(())
}

/// `dW = scale * reshape(B @ A)` alone: what an in-place switch subtracts or adds.
pub fn delta(shape: LayerShape, b: &[f32], a: &[f32], scale: f32) -> Result<Vec<f32>, String> {
    merge_layer(shape, &vec![0.0; shape.weight_len()], b, a, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: dW[o, i, kh, kw] via the flat (Cout*k) x (Cin*k) product, element by element.
    fn naive(shape: LayerShape, w0: &[f32], b: &[f32], a: &[f32], scale: f32) -> Vec<f32> {
        let [rows, inner] = shape.b_shape();
        let cols = shape.a_shape()[1];
        let mut out = w0.to_vec();
        for r in 0..rows {
            for c in 0..cols {
                let mut sum = 0.0f32;
                for j in 0..inner {
                    sum += b[r * inner + j] * a[j * cols + c];
                }
                out[r * cols + c] += scale * sum;
            }
        }
        out
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect()
    }

    #[test]
    fn pointwise_layer_is_plain_low_rank_update() {
        // k = 1: B [Cout, r], A [r, Cin]; W[o, i] = W0[o, i] + scale * sum_j B[o, j] A[j, i]
        let shape = LayerShape {
            out_channels: 3,
            in_channels: 2,
            kernel: 1,
            rank_k: 1,
        };
        let w0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, -1.0];
        let a = [0.5, 2.0];
        let merged = merge_layer(shape, &w0, &b, &a, 4.0).unwrap();
        assert_eq!(merged, [3.0, 10.0, 3.0, 4.0, 3.0, -2.0]);
    }

    #[test]
    fn kxk_layer_matches_naive_reference() {
        let shape = LayerShape {
            out_channels: 24,
            in_channels: 3,
            kernel: 3,
            rank_k: 12,
        };
        let w0 = values(shape.weight_len(), 0.1);
        let b = values(shape.b_shape().iter().product(), 0.7);
        let a = values(shape.a_shape().iter().product(), 1.3);
        let merged = merge_layer(shape, &w0, &b, &a, 4.0).unwrap();
        let expected = naive(shape, &w0, &b, &a, 4.0);
        let max_diff = merged
            .iter()
            .zip(&expected)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(max_diff < 1e-5, "max diff {max_diff}");
    }

    #[test]
    fn zero_b_gives_the_base_weights() {
        let shape = LayerShape {
            out_channels: 4,
            in_channels: 4,
            kernel: 1,
            rank_k: 2,
        };
        let w0 = values(16, 0.3);
        let merged = merge_layer(shape, &w0, &[0.0; 8], &values(8, 2.0), 4.0).unwrap();
        assert_eq!(merged, w0);
    }

    #[test]
    fn switching_in_place_equals_direct_merge() {
        let shape = LayerShape {
            out_channels: 8,
            in_channels: 6,
            kernel: 1,
            rank_k: 4,
        };
        let w0 = values(48, 0.0);
        let (ba, aa) = (values(32, 1.0), values(24, 2.0));
        let (bb, ab) = (values(32, 3.0), values(24, 4.0));
        let w_a = merge_layer(shape, &w0, &ba, &aa, 4.0).unwrap();
        let d_a = delta(shape, &ba, &aa, 4.0).unwrap();
        let d_b = delta(shape, &bb, &ab, 4.0).unwrap();
        let switched: Vec<f32> = w_a
            .iter()
            .zip(&d_a)
            .zip(&d_b)
            .map(|((w, da), db)| w - da + db)
            .collect();
        let direct = merge_layer(shape, &w0, &bb, &ab, 4.0).unwrap();
        let max_diff = switched
            .iter()
            .zip(&direct)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(max_diff < 1e-5, "max diff {max_diff}");
    }

    #[test]
    fn merging_into_a_used_buffer_equals_merge_layer() {
        let shape = LayerShape {
            out_channels: 24,
            in_channels: 16,
            kernel: 3,
            rank_k: 12,
        };
        let w0 = values(shape.weight_len(), 0.1);
        let b = values(shape.b_shape().iter().product(), 0.7);
        let a = values(shape.a_shape().iter().product(), 1.3);
        // A buffer that held another expert's layer: every old value must be overwritten.
        let mut out = values(shape.weight_len(), 9.0);
        merge_layer_into(shape, &w0, &b, &a, 4.0, &mut out).unwrap();
        assert_eq!(out, merge_layer(shape, &w0, &b, &a, 4.0).unwrap());
        let mut short = vec![0.0; shape.weight_len() - 1];
        assert!(merge_layer_into(shape, &w0, &b, &a, 4.0, &mut short).is_err());
    }

    #[test]
    fn wrong_sizes_are_errors_not_panics() {
        let shape = LayerShape {
            out_channels: 2,
            in_channels: 2,
            kernel: 1,
            rank_k: 1,
        };
        assert!(merge_layer(shape, &[0.0; 3], &[0.0; 2], &[0.0; 2], 1.0).is_err());
        assert!(merge_layer(shape, &[0.0; 4], &[0.0; 3], &[0.0; 2], 1.0).is_err());
        assert!(merge_layer(shape, &[0.0; 4], &[0.0; 2], &[0.0; 5], 1.0).is_err());
    }
}
