//! The models run on one trace's inputs: the reference (always) and the engine (the
//! bundle profile, when one is given).

use crate::compare::flat;
use crate::engine_gate::{run_engine, EngineDecode};
use crate::error::Result;
use crate::ladder::{Limits, Profile, Subject};
use crate::trace::OracleTrace;
use candle_core::Tensor;
use q3vl_model::prompt::Prompt;
use q3vl_model::reference::{self, Continuation, ImageInput};

/// What the two models computed on one trace's inputs.
pub struct Runs {
    /// The reference: its taps, the oracle-forced continuation, and (with an engine)
    /// the one forced along the engine's tokens.
    pub reference: reference::ReferenceRun,
    /// The engine's greedy decode.
    pub engine: Option<EngineDecode>,
}

/// The reference on the trace's own ids and pixel values, teacher-forced along the
/// oracle's tokens (one pass serves every decode gate: free-running greedy decode
/// equals it up to the first mismatch); with an engine, the engine's greedy decode
/// first and a second forced pass along its tokens (engine ≡ reference). `replay`
/// (one input per decoder layer) also runs each layer on it (`text.local`).
pub fn run_models(
    subject: &Subject<'_>,
    trace: &OracleTrace,
    prompt: &Prompt,
    oracle_tokens: &[u32],
    limits: &Limits<'_>,
    replay: Option<&[Tensor]>,
) -> Result<Runs> {
    let mut conts = vec![Continuation::Forced(oracle_tokens.to_vec())];
    let pv = trace.images()?;
    let engine = match (limits.profile, subject.engine) {
        (Profile::Bundle, Some(engine)) => {
            let steps = match limits.gates.bundle.engine_steps {
                0 => oracle_tokens.len(),
                n => n,
            };
            let pixels = pv
                .iter()
                .map(|(t, g)| Ok((flat(t)?.0, *g)))
                .collect::<Result<Vec<_>>>()?;
            let pixels: Vec<_> = pixels.iter().map(|(v, g)| (v.as_slice(), *g)).collect();
            let run = run_engine(engine, &prompt.ids, &pixels, steps)?;
            // The engine read every weight through its own maps; drop them from the
            // resident set before the streamed reference runs, so the two peaks do not add.
            engine.language().release_all();
            engine.vision_bundle().release_all();
            conts.push(Continuation::Forced(run.tokens.clone()));
            Some(run)
        }
        _ => None,
    };
    let images: Vec<ImageInput> = pv
        .iter()
        .map(|(t, g)| ImageInput {
            pixel_values: t,
            grid_thw: *g,
        })
        .collect();
    let reference = reference::run_replaying(
        subject.cfg,
        subject.src,
        prompt,
        &images,
        &conts,
        subject.keep_weights,
        replay,
    )?;
    Ok(Runs { reference, engine })
}
