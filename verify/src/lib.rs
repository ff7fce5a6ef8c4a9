//! q3vl's proof of numerics: oracle traces in, stage-by-stage cosines, token gates
//! and reports out. The fp32 ladder runs the reference on the original checkpoint;
//! the quantized ladder runs it on a bundle's weights, and holds the engine's greedy
//! decode against it (engine ≡ reference); the GGUF ladder runs it on a GGUF pair made
//! by anyone, dequantized as llama.cpp reads it, with its metadata checked by name.

pub mod bundle_source;
pub mod compare;
pub mod engine_gate;
pub mod error;
pub mod gates;
pub mod gguf_checks;
pub mod gguf_source;
pub mod html;
pub mod junit;
pub mod ladder;
pub mod noise;
pub mod report;
pub mod self_oracle;
pub mod session;
pub mod stamping;
pub mod stats;
pub mod token_gates;
pub mod tokens;
pub mod trace;

mod fits;
mod layer_inputs;
mod local;
mod pixels;
mod runs;
mod stages;

pub use bundle_source::BundleSource;
pub use engine_gate::{EngineDecode, EngineMatch};
pub use error::{Result, VerifyError};
pub use gates::{GateResult, Gates};
pub use ladder::{verify_trace, Profile, Subject, TraceReport};
pub use report::{NotRun, Report};
pub use session::{verify, write_reports, EngineGate, GgufInput, Progress, Request, Verified};
pub use stamping::Stamping;
pub use trace::OracleTrace;
