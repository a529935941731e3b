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
    lower_is_better: bool,
    values: [Vec<f64>; 3],
    goal: Option<Goal>,
}

/// One line of the table.
pub struct Row {
    name: String,
    lower_is_better: bool,
    values: [Option<f64>; 3],
    goal: Option<Goal>,
}

impl Figure {
    fn new(name: String, latency: bool) -> Self {
        Self {
            name,
            latency,
            lower_is_better: latency,
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

    /// Marks a figure where less is better (latencies are).
    pub fn lower_is_better(mut self) -> Self {
        self.lower_is_better = true;
        self
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
                    lower_is_better: true,
                    values: summary(0.5),
                    goal: self.goal,
                },
                Row {
                    name: format!("{} p99, ms", self.name),
                    lower_is_better: true,
                    values: summary(0.99),
                    goal: None,
                },
            ]
        } else {
            vec![Row {
                name: self.name.clone(),
                lower_is_better: self.lower_is_better,
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

/// The table as a bar chart (SVG): one group per row, each target's bar scaled to the row's
/// largest value, the value written at its end.
pub fn chart(figures: &[Figure]) -> String {
    const COLOURS: [(&str, &str); 3] = [
        ("benchgate", "#1f77b4"),
        ("sshd", "#9e9e9e"),
        ("floor (Docker API)", "#2ca02c"),
    ];
    let (width, label_width, bar_height, group_gap) = (960.0, 20.0, 14.0, 26.0);
    let span = width - label_width - 90.0;
    let rows = figures.iter().flat_map(Figure::rows).collect::<Vec<_>>();
    let mut body = String::new();
    let mut y = 50.0;
    for row in &rows {
        let present: Vec<(usize, f64)> = row
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        let top = present.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
        let better = if row.lower_is_better {
            "lower is better"
        } else {
            "higher is better"
        };
        body.push_str(&format!(
            "<text x=\"{label_width}\" y=\"{y}\" font-size=\"13\">{} ({better})</text>\n",
            escape(&row.name)
        ));
        y += 6.0;
        for (i, value) in present {
            let length = if top > 0.0 { span * value / top } else { 0.0 };
            body.push_str(&format!(
                "<rect x=\"{label_width}\" y=\"{y}\" width=\"{length:.1}\" height=\"{bar_height}\" fill=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>\n",
                COLOURS[i].1,
                label_width + length + 4.0,
                y + bar_height - 3.0,
                number(Some(value))
            ));
            y += bar_height + 2.0;
        }
        y += group_gap;
    }
    let mut legend = String::new();
    for (i, (name, colour)) in COLOURS.iter().enumerate() {
        let x = label_width + 170.0 * i as f64;
        legend.push_str(&format!(
            "<rect x=\"{x}\" y=\"14\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"25\" font-size=\"13\">{name}</text>\n",
            x + 16.0
        ));
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{y}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         {legend}{body}</svg>\n"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
