//! `q3vl chat`: a conversation in the terminal. Answers stream as they are chosen;
//! `/image PATH` attaches an image to the next message, `/reset` starts over, `/exit`
//! (or Ctrl-D) quits. Each turn starts from the previous turn's cached prompt
//! ([`q3vl_engine::PromptCache`]), so only the new text runs through the model, and
//! message text is text ([`q3vl_model::conversation`]).

use crate::Outcome;
use anyhow::Context;
use q3vl_engine::detokenize::StreamDecoder;
use q3vl_engine::{EncodedImage, Engine, GenerateParams, PromptCache};
use q3vl_model::conversation::{Message, Part, Role};
use q3vl_model::prompt::PromptBuilder;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `q3vl chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// A conversion's output folder (or its language bundle folder).
    #[arg(long)]
    pub bundle: PathBuf,
    /// A system message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens to generate at most per answer.
    #[arg(long, default_value_t = 512, value_parser = crate::common::count_up_to(1 << 20))]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// PRNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = crate::common::threads())]
    pub threads: Option<usize>,
    /// Resize images with smart_resize instead of the fixed grid.
    #[arg(long)]
    pub dynamic_resolution: bool,
    /// Refuse a bundle without a valid verification stamp.
    #[arg(long)]
    pub require_verified: bool,
}

/// The conversation so far.
struct Conversation {
    messages: Vec<Message>,
    /// Every image of the conversation, in order.
    images: Vec<Arc<EncodedImage>>,
    /// Images attached to the next message.
    pending: Vec<Arc<EncodedImage>>,
    /// The last turn's prompt, for the next to start from.
    cache: Option<PromptCache>,
}

impl Conversation {
    fn new(system: Option<&str>) -> Conversation {
        Conversation {
            messages: system
                .map(|s| Message::text(Role::System, s))
                .into_iter()
                .collect(),
            images: vec![],
            pending: vec![],
            cache: None,
        }
    }
}

/// Runs `q3vl chat` until `/exit` or end of input.
pub fn run(a: ChatArgs) -> anyhow::Result<Outcome> {
    if !a.temperature.is_finite() || a.temperature < 0.0 {
        anyhow::bail!(
            "--temperature must be a finite number ≥ 0, got {}",
            a.temperature
        );
    }
    let (engine, stamp_line) = crate::run::open_engine(
        &a.bundle,
        a.threads,
        false,
        None,
        a.require_verified.then_some("--require-verified"),
    )?;
    let pb = engine.prompt_builder()?;
    let tty = std::io::stdin().is_terminal();
    eprintln!("{stamp_line}");
    eprintln!("q3vl chat: /image PATH attaches an image to your next message, /reset starts over, /exit quits.");
    let mut conv = Conversation::new(a.system.as_deref());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if tty {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim();
        match command(line) {
            Some(("exit" | "quit", _)) => break,
            Some(("reset", _)) => {
                conv = Conversation::new(a.system.as_deref());
                eprintln!("(the conversation starts over)");
            }
            Some(("image", path)) => match attach(&engine, path, a.dynamic_resolution) {
                Ok(f) => {
                    eprintln!("(image {path}: {} tokens; ask about it)", f.tokens);
                    conv.pending.push(f);
                }
                Err(e) => eprintln!("error: {}", crate::common::one_line(&e)),
            },
            Some((other, _)) => {
                eprintln!("error: unknown command /{other} (/image PATH, /reset, /exit)")
            }
            None if line.is_empty() => {}
            None => {
                if let Err(e) = turn(&engine, &pb, &mut conv, line, &a) {
                    eprintln!("error: {}", crate::common::one_line(&e));
                }
            }
        }
    }
    Ok(Outcome::Success)
}

/// A `/command argument` line, split.
fn command(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('/')?;
    Some(
        rest.split_once(' ')
            .map_or((rest, ""), |(c, a)| (c, a.trim())),
    )
}

/// An image read, preprocessed and run through the tower.
fn attach(engine: &Engine, path: &str, dynamic: bool) -> anyhow::Result<Arc<EncodedImage>> {
    anyhow::ensure!(!path.is_empty(), "/image needs a path");
    let rgb = q3vl_model::image::load_rgb(path.as_ref())?;
    let patched = engine
        .preprocess(&rgb, dynamic)
        .with_context(|| path.to_string())?;
    Ok(Arc::new(
        engine.encode_image(&patched.pixel_values, patched.grid_thw)?,
    ))
}

/// One turn: the user's message (with the attached images), the streamed answer; the
/// conversation grows by both only when the answer is complete.
fn turn(
    engine: &Engine,
    pb: &PromptBuilder,
    conv: &mut Conversation,
    text: &str,
    a: &ChatArgs,
) -> anyhow::Result<()> {
    let mut parts = vec![Part::Image; conv.pending.len()];
    parts.push(Part::Text(text.to_string()));
    let mut messages = conv.messages.clone();
    messages.push(Message {
        role: Role::User,
        parts,
    });
    let images: Vec<Arc<EncodedImage>> = conv.images.iter().chain(&conv.pending).cloned().collect();
    let grids: Vec<[usize; 3]> = images.iter().map(|f| f.grid_thw).collect();
    let prompt = pb.conversation(&messages, &grids)?;
    let params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        seed: a.seed,
        ..GenerateParams::default()
    };
    let mut seq = engine.begin(&prompt.ids, &images, &params, conv.cache.as_ref())?;
    let tok = pb.tokenizer();
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let mut stream = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    {
        let mut show = |id: u32| -> std::io::Result<()> {
            if engine.eos_ids().contains(&id) {
                return Ok(());
            }
            let piece = stream.push(id, &decode).unwrap_or_default();
            out.write_all(piece.as_bytes())?;
            out.flush()
        };
        if let Some(id) = engine.prefill(&mut seq, usize::MAX)? {
            show(id)?;
        }
        while seq.decoding() {
            let id = engine.decode_step(&mut [&mut seq])?[0];
            show(id)?;
        }
    }
    let rest = stream.finish(&decode).unwrap_or_default();
    writeln!(out, "{rest}")?;
    let answer = pb.decode(&seq.generation().tokens)?;
    messages.push(Message::text(Role::Assistant, answer));
    conv.messages = messages;
    conv.images = images;
    conv.pending.clear();
    conv.cache = Some(seq.into_prompt_cache());
    Ok(())
}
