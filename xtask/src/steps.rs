//! Runs the steps of a task, times them, and prints a table of outcomes and times at the end.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

enum Outcome {
    Ok,
    Failed,
    Skipped(String),
}

pub struct Steps {
    task: &'static str,
    start: Instant,
    done: Vec<(String, Duration, Outcome)>,
}

impl Steps {
    pub fn new(task: &'static str) -> Self {
        Steps {
            task,
            start: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Runs one step. A failure is printed right away and recorded; returns whether it succeeded,
    /// so the caller decides if later steps still make sense.
    pub fn run(&mut self, name: &str, step: impl FnOnce() -> Result<()>) -> bool {
        let start = Instant::now();
        let result = step();
        let elapsed = start.elapsed();
        let outcome = match result {
            Ok(()) => Outcome::Ok,
            Err(e) => {
                eprintln!(
                    "xtask {}: {name} failed: {}",
                    self.task,
                    crate::error_text(&e)
                );
                Outcome::Failed
            }
        };
        let ok = matches!(outcome, Outcome::Ok);
        self.done.push((name.to_owned(), elapsed, outcome));
        ok
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        println!("{name}: skipped ({why})");
        self.done.push((
            name.to_owned(),
            Duration::ZERO,
            Outcome::Skipped(why.to_owned()),
        ));
    }

    /// Prints every step's outcome and time; fails if any step failed.
    pub fn finish(self) -> Result<()> {
        let width = self.done.iter().map(|(n, ..)| n.len()).max().unwrap_or(0);
        println!("xtask {}: steps", self.task);
        for (name, elapsed, outcome) in &self.done {
            let (time, what) = match outcome {
                Outcome::Ok => (secs(*elapsed), "ok".to_owned()),
                Outcome::Failed => (secs(*elapsed), "FAILED".to_owned()),
                Outcome::Skipped(why) => ("-".to_owned(), format!("skipped ({why})")),
            };
            println!("  {name:<width$}  {time:>8}  {what}");
        }
        println!("  {:<width$}  {:>8}", "total", secs(self.start.elapsed()));
        let failed: Vec<&str> = self
            .done
            .iter()
            .filter(|(_, _, o)| matches!(o, Outcome::Failed))
            .map(|(n, ..)| n.as_str())
            .collect();
        if !failed.is_empty() {
            bail!("{} failed: {}", self.task, failed.join(", "));
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
