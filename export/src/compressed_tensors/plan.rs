//! Which tensors a compressed-tensors export holds, and where each one's bytes come
//! from in the bundles.
//!
//! - Every decoder linear stored int8 per-block-32 (`int8-block32-clip`) becomes the
//!   three tensors of a `pack-quantized` module: `weight_packed` (the same int8
//!   values, [`super::pack`]), `weight_scale` (the same f16 scales, widened exactly to
//!   f32) and `weight_shape`. Lossless. The scales are f32 because the library
//!   dequantizes in the scale's dtype as stored: from f16 scales, transformers'
//!   `dequantize=True` load would round every `q · s` to f16.
//! - An int8 LM head (`int8-block32-absmax`, the `int8hu` mode) stays dense: vLLM
//!   quantizes only `Linear` layers through compressed-tensors, and its head is an
//!   embedding-like layer. It is stored f32 as `q · s`, which is exact (an 8-bit
//!   integer times an f16 needs at most 19 significant bits).
//! - Everything else (embeddings, norms, the vision tower, an f16 head, f16
//!   fallbacks) is the bundle's stored bytes under the same HF name.

use crate::error::{ExportError, Result};
use q3vl_bundle::names::scales_name;
use q3vl_bundle::{Bundle, Bundles, Dtype, Scheme, TensorPlan};
use q3vl_model::layout::{TensorClass, LM_HEAD};

/// Which bundle of the pair a tensor is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The language bundle.
    Language,
    /// The vision bundle.
    Vision,
}

/// Where one exported tensor's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `weight_packed` of the language bundle's int8 weight of this name.
    Packed(String),
    /// The f16 scales of the language bundle's int8 weight of this name, widened
    /// exactly to f32.
    Scale(String),
    /// `weight_shape`, `[out, in]` as int64.
    Shape([usize; 2]),
    /// A bundle tensor as stored (f16 or f32).
    Stored(Which, String),
    /// The language bundle's int8 weight of this name as f32 `q · s` (exact).
    Dequantized(String),
}

/// One tensor of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTensor {
    /// Its name, dtype and shape in the export.
    pub plan: TensorPlan,
    /// Where its bytes come from.
    pub origin: Origin,
}

/// Every tensor of an export, and the linear modules it leaves dense.
#[derive(Debug, Clone, Default)]
pub struct ExportPlan {
    /// The tensors, language bundle first, each bundle in name order.
    pub tensors: Vec<ExportTensor>,
    /// Linear modules stored `pack-quantized` (HF module paths).
    pub compressed: Vec<String>,
    /// Linear modules left dense (the quantization config's `ignore` list).
    pub ignore: Vec<String>,
    /// Whether the head is the int8 head stored dense f32.
    pub head_dequantized: bool,
}

/// The module path of a weight tensor (`….q_proj.weight` → `….q_proj`).
fn module_of(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

/// Plans the export of `bundles`. An fp16 bundle (nothing quantized) is refused: it
/// has nothing to compress.
pub fn build(bundles: &Bundles) -> Result<ExportPlan> {
    let mut plan = ExportPlan::default();
    plan_language(&bundles.language, &mut plan)?;
    if plan.compressed.is_empty() {
        return Err(ExportError::Unsupported {
            path: bundles.language.dir().to_path_buf(),
            msg: "holds no int8 weights (an fp16 bundle?): nothing to compress; export an \
                  int8hu or int8lin bundle"
                .into(),
        });
    }
    plan_vision(&bundles.vision, &mut plan)?;
    // The head module exists in HF's model whether or not the bundle stores it (a tied
    // head is the embedding); either way it is not pack-quantized.
    if !plan.ignore.iter().any(|m| m == module_of(LM_HEAD)) {
        plan.ignore.push(module_of(LM_HEAD).to_string());
    }
    plan.ignore.sort();
    Ok(plan)
}

fn plan_language(b: &Bundle, plan: &mut ExportPlan) -> Result<()> {
    let (linear, head) = (TensorClass::TextLinear.as_str(), TensorClass::Head.as_str());
    for (name, meta) in &b.metadata().tensors {
        let (dtype, shape, _) = b.raw(name)?;
        let shape = shape.to_vec();
        let class = meta.class.as_str();
        let (tensor_dtype, origin) = match meta.scheme {
            Scheme::Int8Clip if class == linear => {
                plan_packed(b, name, &shape, plan)?;
                continue;
            }
            Scheme::Int8AbsMax | Scheme::Int8Clip if class == head => {
                check_blocks(b, name, &shape)?;
                plan.head_dequantized = true;
                (Dtype::F32, Origin::Dequantized(name.clone()))
            }
            Scheme::Int8AbsMax | Scheme::Int8Clip => {
                return Err(ExportError::Unsupported {
                    path: b.dir().to_path_buf(),
                    msg: format!(
                        "tensor {name}: scheme {} of class {class} has no place in this export",
                        meta.scheme.as_str()
                    ),
                })
            }
            Scheme::F16 | Scheme::F32 => (dtype, Origin::Stored(Which::Language, name.clone())),
        };
        // A head or an f16 fallback of a decoder linear: a linear module left dense.
        if class == linear || class == head {
            plan.ignore.push(module_of(name).to_string());
        }
        plan.tensors.push(ExportTensor {
            plan: TensorPlan::new(name.as_str(), tensor_dtype, shape),
            origin,
        });
    }
    Ok(())
}

/// The three tensors of one `pack-quantized` module.
fn plan_packed(b: &Bundle, name: &str, shape: &[usize], plan: &mut ExportPlan) -> Result<()> {
    let [out, inp] = check_blocks(b, name, shape)?;
    let (sdtype, sshape, _) = b.raw(&scales_name(name))?;
    if sdtype != Dtype::F16 || sshape != [out, inp / q3vl_bundle::BLOCK] {
        return Err(ExportError::Unsupported {
            path: b.dir().to_path_buf(),
            msg: format!(
                "tensor {}: {sdtype} {sshape:?}, not F16 [{out}, {}]",
                scales_name(name),
                inp / q3vl_bundle::BLOCK
            ),
        });
    }
    let module = module_of(name);
    let t = |leaf: &str, dtype: Dtype, shape: Vec<usize>, origin: Origin| ExportTensor {
        plan: TensorPlan::new(format!("{module}.{leaf}"), dtype, shape),
        origin,
    };
    plan.tensors.extend([
        t(
            "weight_packed",
            Dtype::I32,
            vec![out, inp / 4],
            Origin::Packed(name.into()),
        ),
        t(
            "weight_scale",
            Dtype::F32,
            sshape.to_vec(),
            Origin::Scale(name.into()),
        ),
        t(
            "weight_shape",
            Dtype::I64,
            vec![2],
            Origin::Shape([out, inp]),
        ),
    ]);
    plan.compressed.push(module.to_string());
    Ok(())
}

/// An int8 weight's `[out, in]`, refused unless `in` is a positive multiple of the block.
fn check_blocks(b: &Bundle, name: &str, shape: &[usize]) -> Result<[usize; 2]> {
    match *shape {
        [out, inp] if inp > 0 && inp % q3vl_bundle::BLOCK == 0 => Ok([out, inp]),
        _ => Err(ExportError::Unsupported {
            path: b.dir().to_path_buf(),
            msg: format!(
                "tensor {name}: an int8 weight of shape {shape:?}, not [out, in] with in a \
                 positive multiple of {}",
                q3vl_bundle::BLOCK
            ),
        }),
    }
}

fn plan_vision(b: &Bundle, plan: &mut ExportPlan) -> Result<()> {
    for (name, meta) in &b.metadata().tensors {
        let (dtype, shape, _) = b.raw(name)?;
        if dtype == Dtype::I8 {
            return Err(ExportError::Unsupported {
                path: b.dir().to_path_buf(),
                msg: format!("tensor {name}: an int8 vision tensor; q3vl's vision bundles are f16"),
            });
        }
        // A vision linear is a 2-D `.weight` of the tower's f16 class (the patch
        // embedding is a 5-D convolution, the position table an embedding).
        if meta.class == TensorClass::Vision.as_str()
            && shape.len() == 2
            && name.ends_with(".weight")
        {
            plan.ignore.push(module_of(name).to_string());
        }
        plan.tensors.push(ExportTensor {
            plan: TensorPlan::new(name.as_str(), dtype, shape.to_vec()),
            origin: Origin::Stored(Which::Vision, name.clone()),
        });
    }
    Ok(())
}
