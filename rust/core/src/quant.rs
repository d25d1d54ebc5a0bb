//! The quantized weight formats, one entry each: what their stored tensors look like,
//! which scale dtypes they accept, how their scale grid must be shaped, how many bytes a
//! row span of their data takes, and how a row is dequantized. The planner and the
//! executor ask this module and nothing else (they have no per-format branches), so a new
//! format is one more [`QuantFormat`] variant here with its methods (its row kernel may
//! use the number-format helpers of [`crate::convert`]) plus its tests.

use crate::checkpoint::{Checkpoint, TensorId};
use crate::convert::{dequant_fp8_row, dequant_int4_row, dequant_mxfp4_row};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::OpKind;

/// What a checkpoint tensor is to a quantized linear.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// The stored weight values.
    Data,
    /// Their scales.
    Scale,
    /// compressed-tensors' `[rows, cols]` record of the logical shape (checked, not copied).
    Shape,
}

/// Checkpoint suffixes of a quantized linear's tensors besides a plain `weight` (whose
/// dtype tells whether it is quantized, [`QuantFormat::of_data`]), longest match first.
pub const QUANT_SUFFIXES: [(&str, Role); 4] = [
    ("weight_packed", Role::Data),
    ("weight_scale_inv", Role::Scale),
    ("weight_scale", Role::Scale),
    ("weight_shape", Role::Shape),
];

/// A dequantizing op: a quantized weight and its scale tensor, expanded into `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dequant {
    pub format: QuantFormat,
    pub scale: TensorId,
    pub scale_dtype: Dtype,
    /// The weight rows x columns one scale covers: `(1, group)` for per-group formats,
    /// the block for FP8 block.
    pub block: (u64, u64),
    pub to: Dtype,
}

impl Dequant {
    /// Bytes read to produce `rows x cols` outputs (data and scales).
    pub fn bytes_read(&self, rows: u64, cols: u64) -> u64 {
        rows * self.format.data_bytes(cols)
            + rows.div_ceil(self.block.0) * cols.div_ceil(self.block.1) * self.scale_dtype.size()
    }
}

/// A quantized linear weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// compressed-tensors `pack-quantized` int4: `weight_packed` I32 `[out, in/8]`,
    /// `weight_scale` float `[out, in/group]`, optional `weight_shape` `[2]`.
    Int4,
    /// Quark / OCP MXFP4: `weight` U8 `[out, in/2]`, e8m0 `weight_scale` `[out, in/group]`.
    Mxfp4,
    /// FP8 block: `weight` F8_E4M3 `[out, in]`, `weight_scale_inv` `[ceil(out/br), ceil(in/bc)]`
    /// as f32 / bf16 / f16 multipliers or E8M0 powers of two (`scale_fmt: ue8m0`).
    Fp8Block,
}

/// Options of the quantized formats that come from the checkpoint's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    /// FP8 block size `[rows, cols]` (`weight_block_size`).
    pub fp8_block: (u64, u64),
    /// The int4 group size the config declares (`group_size`), if it declares one.
    pub int4_group: Option<u64>,
    /// The MXFP4 group size the config declares, if it declares one.
    pub mxfp4_group: Option<u64>,
}

impl Default for QuantParams {
    fn default() -> Self {
        QuantParams {
            fp8_block: (128, 128),
            int4_group: None,
            mxfp4_group: None,
        }
    }
}

impl QuantFormat {
    /// Every format.
    pub const ALL: [QuantFormat; 3] =
        [QuantFormat::Int4, QuantFormat::Mxfp4, QuantFormat::Fp8Block];

    /// The checkpoint suffixes of one quantized linear in this format: the tensors that
    /// are updated together or not at all.
    pub fn suffixes(self) -> &'static [&'static str] {
        match self {
            QuantFormat::Int4 => &["weight_packed", "weight_scale", "weight_shape"],
            QuantFormat::Mxfp4 => &["weight", "weight_scale"],
            QuantFormat::Fp8Block => &["weight", "weight_scale_inv"],
        }
    }

    /// The format whose stored weight has dtype `d`, if any.
    pub fn of_data(d: Dtype) -> Option<QuantFormat> {
        match d {
            Dtype::I32 => Some(QuantFormat::Int4),
            Dtype::U8 => Some(QuantFormat::Mxfp4),
            Dtype::F8E4M3 => Some(QuantFormat::Fp8Block),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Int4 => "ct-int4",
            QuantFormat::Mxfp4 => "MXFP4",
            QuantFormat::Fp8Block => "FP8 block",
        }
    }

    /// Logical weight columns per stored element.
    pub fn values_per_element(self) -> u64 {
        match self {
            QuantFormat::Int4 => 8,
            QuantFormat::Mxfp4 => 2,
            QuantFormat::Fp8Block => 1,
        }
    }

    /// Bytes of stored data holding `cols` logical columns of one row.
    pub fn data_bytes(self, cols: u64) -> u64 {
        match self {
            QuantFormat::Int4 | QuantFormat::Mxfp4 => cols / 2,
            QuantFormat::Fp8Block => cols,
        }
    }

    /// The name of its op in `Plan.op_counts()`.
    pub fn op_name(self) -> &'static str {
        match self {
            QuantFormat::Int4 => "dequant_int4",
            QuantFormat::Mxfp4 => "dequant_mxfp4",
            QuantFormat::Fp8Block => "dequant_fp8",
        }
    }

    /// Dequantizes `n` columns of one row (starting at a scale-group boundary): `data`
    /// holds their stored bytes, `scale` the scales that cover them, `out` receives `n`
    /// values of `to`.
    #[allow(clippy::too_many_arguments)]
    pub fn dequant_row(
        self,
        data: &[u8],
        scale: &[u8],
        scale_dtype: Dtype,
        group_cols: usize,
        n: usize,
        out: &mut [u8],
        to: Dtype,
    ) {
        match self {
            QuantFormat::Int4 => dequant_int4_row(data, scale, scale_dtype, group_cols, n, out, to),
            QuantFormat::Mxfp4 => dequant_mxfp4_row(data, scale, group_cols, n, out, to),
            QuantFormat::Fp8Block => {
                dequant_fp8_row(data, scale, scale_dtype, group_cols, n, out, to)
            }
        }
    }

    /// The scale dtypes the format's dequantizer reads.
    pub fn scale_dtypes(self) -> &'static [Dtype] {
        match self {
            QuantFormat::Int4 => &[Dtype::BF16, Dtype::F16, Dtype::F32],
            QuantFormat::Mxfp4 => &[Dtype::U8, Dtype::F8E8M0],
            QuantFormat::Fp8Block => &[Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::F8E8M0],
        }
    }

    /// Checks the scale tensor against the weight and returns the op that dequantizes
    /// them into `to`, with the logical column count of the weight.
    pub fn op_kind(
        self,
        ckpt: &Checkpoint,
        data: TensorId,
        scale: TensorId,
        params: &QuantParams,
        to: Dtype,
    ) -> Result<(OpKind, u64)> {
        let de = ckpt.entry(data);
        let se = ckpt.entry(scale);
        if de.shape.len() != 2 {
            return Err(Error::shape(
                &ckpt.shard(data).path,
                &de.name,
                None,
                format!("a {} weight is 2-D", self.name()),
                vec![],
                de.shape.to_vec(),
            ));
        }
        if !self.scale_dtypes().contains(&se.dtype) {
            return Err(Error::Unsupported {
                file: ckpt.shard(scale).path.clone(),
                reason: format!(
                    "tensor '{}': a {} scale must be one of {}, not {}",
                    se.name,
                    self.name(),
                    self.scale_dtypes()
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    se.dtype
                ),
            });
        }
        let (r, c) = (de.shape[0], de.shape[1]);
        let cols = c * self.values_per_element();
        let grid = |expected: [u64; 2], why: &str| -> Result<()> {
            if se.shape.len() == 2 && se.shape[0] == expected[0] && se.shape[1] == expected[1] {
                Ok(())
            } else {
                Err(Error::shape(
                    &ckpt.shard(scale).path,
                    &se.name,
                    None,
                    why,
                    expected.to_vec(),
                    se.shape.to_vec(),
                ))
            }
        };
        match self {
            QuantFormat::Int4 | QuantFormat::Mxfp4 => {
                let declared = match self {
                    QuantFormat::Int4 => params.int4_group,
                    _ => params.mxfp4_group,
                };
                let sc = if se.shape.len() == 2 { se.shape[1] } else { 0 };
                // without a declared group size, the grid must still be a whole number of
                // even-sized groups
                let group = declared.unwrap_or(if sc > 0 && cols.is_multiple_of(sc) {
                    cols / sc
                } else {
                    32
                });
                if group == 0 || group % 2 != 0 || !cols.is_multiple_of(group) {
                    return Err(Error::Unsupported {
                        file: ckpt.shard(data).path.clone(),
                        reason: format!(
                            "tensor '{}': {cols} columns cannot be split into {} groups of {group}",
                            de.name,
                            self.name()
                        ),
                    });
                }
                let why = match declared {
                    Some(g) => format!("{} scales for group_size {g} from the config", self.name()),
                    None => format!("{} group scales", self.name()),
                };
                grid([r, cols / group], &why)?;
                let kind = OpKind::Dequant(Dequant {
                    format: self,
                    scale,
                    scale_dtype: se.dtype,
                    block: (1, group),
                    to,
                });
                Ok((kind, cols))
            }
            QuantFormat::Fp8Block => {
                let (br, bc) = params.fp8_block;
                grid(
                    [r.div_ceil(br), c.div_ceil(bc)],
                    &format!("FP8 block scales for weight_block_size [{br}, {bc}]"),
                )?;
                Ok((
                    OpKind::Dequant(Dequant {
                        format: self,
                        scale,
                        scale_dtype: se.dtype,
                        block: (br, bc),
                        to,
                    }),
                    cols,
                ))
            }
        }
    }
}

/// Reads a small integer tensor (a compressed-tensors `weight_shape`, any integer dtype)
/// with `pread`, as `i128` values.
pub fn read_ints(ckpt: &Checkpoint, id: TensorId) -> Result<Vec<i128>> {
    let e = ckpt.entry(id);
    let size = e.dtype.size() as usize;
    let n: u64 = e.shape.iter().product();
    if n > 16 {
        return Err(Error::shape(
            &ckpt.shard(id).path,
            &e.name,
            None,
            "weight_shape holds [rows, cols]",
            vec![2],
            e.shape.to_vec(),
        ));
    }
    let mut buf = vec![0u8; n as usize * size];
    let shard = ckpt.shard(id);
    shard
        .read_at(shard.abs_offset(e), &mut buf)
        .map_err(|err| match err {
            Error::Io { file, source, .. } => Error::Io {
                file,
                tensor: Some(e.name.to_string()),
                source,
            },
            other => other,
        })?;
    let signed = matches!(e.dtype, Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64);
    Ok(buf
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 16];
            b[..size].copy_from_slice(c);
            if signed && c[size - 1] & 0x80 != 0 {
                b[size..].fill(0xff);
            }
            i128::from_le_bytes(b)
        })
        .collect())
}

/// Checks a compressed-tensors `weight_shape` companion: an integer vector `[2]` equal to
/// the logical `[rows, cols]` of its packed weight.
pub fn check_weight_shape(ckpt: &Checkpoint, shape: TensorId, rows: u64, cols: u64) -> Result<()> {
    let e = ckpt.entry(shape);
    let integer = matches!(
        e.dtype,
        Dtype::I8
            | Dtype::I16
            | Dtype::I32
            | Dtype::I64
            | Dtype::U8
            | Dtype::U16
            | Dtype::U32
            | Dtype::U64
    );
    if !integer {
        return Err(Error::Unsupported {
            file: ckpt.shard(shape).path.clone(),
            reason: format!(
                "tensor '{}': weight_shape must hold integers, not {}",
                e.name, e.dtype
            ),
        });
    }
    let values = read_ints(ckpt, shape)?;
    if e.shape.as_slice() != [2] || values != [rows as i128, cols as i128] {
        return Err(Error::shape(
            &ckpt.shard(shape).path,
            &e.name,
            None,
            format!("weight_shape holds {values:?}; the packed weight is [{rows}, {cols}]"),
            vec![rows, cols],
            values
                .iter()
                .map(|&v| u64::try_from(v).unwrap_or(u64::MAX))
                .collect(),
        ));
    }
    Ok(())
}
