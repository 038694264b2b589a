//! The attention of one layer: for each head, the token each query attends to most.
//!
//! ```sh
//! cargo run --release --example attention -- [MODEL_DIR] [LAYER] ["prompt"]
//! ```

use gpt2::inspect::{for_each_layer, LayerChoice, Selection, Tokens};
use gpt2::prompt::{Prompt, PromptOptions};
use gpt2::{Error, LoadOptions, ModelSource};

/// An error as a sentence (a `main` returning `Result` prints its `Debug` form), and how to
/// call this example.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "usage: cargo run --release --example attention -- [MODEL_DIR] [LAYER] [\"prompt\"] \
                 (without MODEL_DIR, GPT-2 small from the Hub)"
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let source = args
        .next()
        .map_or_else(|| ModelSource::hub("gpt2", "main"), ModelSource::dir);
    let layer: usize = args.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    let text = args
        .next()
        .unwrap_or_else(|| "When Mary and John went to the store, John gave a drink to".into());

    // Attention at layer L depends on nothing above it: load only layers 0..=L.
    let loaded = source.load(&LoadOptions::default().first_layers(layer + 1))?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let prompt = Prompt::new(tokenizer, &text, model.config(), PromptOptions::default())?;
    let tokens = Tokens::new(tokenizer, &prompt)?;
    let selection = Selection::new(model.config(), LayerChoice::One(layer), None)?;

    for_each_layer(model, &tokens.ids, &selection, |a| {
        for (i, head) in a.heads.iter().enumerate() {
            let targets: Vec<String> = (0..a.len)
                .map(|q| {
                    let row = a.row(i, q);
                    let k = (0..=q)
                        .max_by(|&x, &y| row[x].total_cmp(&row[y]))
                        .unwrap_or(0);
                    format!("{:?}->{:?}", tokens.text[q], tokens.text[k])
                })
                .collect();
            println!("layer {} head {head}: {}", a.layer, targets.join(" "));
        }
        Ok(())
    })
}
