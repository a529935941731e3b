//! Figures, their summaries (median of rounds; p50/p99 of pooled latencies), the targets of
//! issue 6, and the printed and machine-readable tables.

use std::time::Duration;

use serde_json::{json, Value};

/// Who a figure was measured on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Who {
    Benchgate,
    Sshd,
    Floor,
}

const WHO: [Who; 3] = [Who::Benchgate, Who::Sshd, Who::Floor];

/// A target benchgate's figure is held to.
#[derive(Clone, Copy)]
pub enum Goal {
    /// At least this many times sshd's figure.
    TimesSshd(f64),
    /// No more than this many milliseconds above the floor.
    WithinFloorMs(f64),
    /// At least this share of the floor, and no less than sshd.
    ShareOfFloorAndSshd(f64),
    /// No more than this.
    AtMost(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::TimesSshd(x) => format!(">= {x}x sshd"),
            Goal::WithinFloorMs(ms) => format!("<= floor + {ms} ms"),
            Goal::ShareOfFloorAndSshd(s) => format!(">= {:.0}% floor, >= sshd", s * 100.0),
            Goal::AtMost(v) => format!("<= {v}"),
        }
    }

    fn met(self, [ours, sshd, floor]: [Option<f64>; 3]) -> Option<bool> {
        let ours = ours?;
        Some(match self {
            Goal::TimesSshd(x) => ours >= x * sshd?,
            Goal::WithinFloorMs(ms) => ours <= floor? + ms,
            Goal::ShareOfFloorAndSshd(s) => ours >= s * floor? && ours >= sshd?,
            Goal::AtMost(v) => ours <= v,
        })
    }
}

/// One measured quantity, per target: values of each round, or latency samples.
pub struct Figure {
    name: String,
    latency: bool,
    values: [Vec<f64>; 3],
    goal: Option<Goal>,
}

/// One line of the table.
pub struct Row {
    name: String,
    values: [Option<f64>; 3],
    goal: Option<Goal>,
}

impl Figure {
    fn new(name: String, latency: bool) -> Self {
        Self {
            name,
            latency,
            values: Default::default(),
            goal: None,
        }
    }

    /// Something per second, or per session: the median of the rounds.
    pub fn median(name: String) -> Self {
        Self::new(name, false)
    }

    /// Latencies: p50 and p99 of every sample.
    pub fn latency(name: String) -> Self {
        Self::new(name, true)
    }

    /// Holds benchgate's figure (the p50, for latencies) to `goal`.
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }

    /// One round's value.
    pub fn add(&mut self, who: Who, value: f64) {
        self.values[who as usize].push(value);
    }

    /// Latency samples.
    pub fn add_samples(&mut self, who: Who, samples: &[Duration]) {
        self.values[who as usize].extend(samples.iter().map(|d| d.as_secs_f64() * 1e3));
    }

    fn rows(&self) -> Vec<Row> {
        let summary = |quantile: f64| {
            WHO.map(|who| {
                let mut v = self.values[who as usize].clone();
                if v.is_empty() {
                    return None;
                }
                v.sort_by(f64::total_cmp);
                let at = ((v.len() - 1) as f64 * quantile).round() as usize;
                Some(v[at])
            })
        };
        if self.latency {
            vec![
                Row {
                    name: format!("{} p50, ms", self.name),
                    values: summary(0.5),
                    goal: self.goal,
                },
                Row {
                    name: format!("{} p99, ms", self.name),
                    values: summary(0.99),
                    goal: None,
                },
            ]
        } else {
            vec![Row {
                name: self.name.clone(),
                values: summary(0.5),
                goal: self.goal,
            }]
        }
    }
}

impl Row {
    fn ratio(&self, of: Who) -> Option<f64> {
        Some(self.values[0]? / self.values[of as usize]?)
    }
}

fn number(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v.abs() < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// The Markdown table the harness prints and the README quotes.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| figure | benchgate | sshd | floor | benchgate/sshd | benchgate/floor | target | met |\n\
         |---|---:|---:|---:|---:|---:|---|---|\n",
    );
    for row in figures.iter().flat_map(Figure::rows) {
        let ratio = |of| row.ratio(of).map_or("—".into(), |r| format!("{r:.2}x"));
        let (target, met) = match row.goal {
            Some(goal) => (
                goal.describe(),
                match goal.met(row.values) {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                },
            ),
            None => (String::new(), ""),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.name,
            number(row.values[0]),
            number(row.values[1]),
            number(row.values[2]),
            ratio(Who::Sshd),
            ratio(Who::Floor),
            target,
            met
        ));
    }
    out
}

/// The same figures as JSON, with every raw round value.
pub fn json(figures: &[Figure]) -> Value {
    let rows: Vec<Value> = figures
        .iter()
        .flat_map(|figure| {
            figure.rows().into_iter().map(move |row| {
                json!({
                    "figure": row.name,
                    "benchgate": row.values[0],
                    "sshd": row.values[1],
                    "floor": row.values[2],
                    "benchgate_per_sshd": row.ratio(Who::Sshd),
                    "benchgate_per_floor": row.ratio(Who::Floor),
                    "target": row.goal.map(Goal::describe),
                    "met": row.goal.and_then(|g| g.met(row.values)),
                    "rounds": if figure.latency { Value::Null } else { json!(figure.values) },
                })
            })
        })
        .collect();
    json!({
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "figures": rows,
    })
}
