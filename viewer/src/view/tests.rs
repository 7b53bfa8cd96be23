//! Screens and widgets rendered into ratatui's `TestBackend` and compared with expected buffers.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{
    Event, KeyCode, KeyEvent, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::widgets::Widget;
use slug_schema::Direction;

use crate::run::draw_frame;
use crate::state::app::{App, Mode, Selection};
use crate::state::event::TraceEvent;
use crate::state::fixture;
use crate::state::timeline::{LinkBins, Timeline, Window};
use crate::view::{detail, help, legend, links, style};

fn app(stages: usize, steps: u64) -> App {
    App::new(
        Timeline::new(Box::new(fixture::pipeline(stages, steps, 64))),
        "fixture",
    )
}

/// The buffer with styles dropped, for comparison with `Buffer::with_lines`.
fn plain(buf: &Buffer) -> Buffer {
    let mut b = buf.clone();
    b.set_style(b.area, Style::reset());
    b
}

fn screen(app: &mut App, w: u16, h: u16) -> Buffer {
    let mut term = Terminal::new(TestBackend::new(w, h)).expect("test backend");
    draw_frame(&mut term, app).expect("draws");
    plain(term.backend().buffer())
}

fn text(b: &Buffer) -> Vec<String> {
    (0..b.area.height)
        .map(|y| (0..b.area.width).map(|x| b[(x, y)].symbol()).collect())
        .collect()
}

fn press(app: &mut App, code: KeyCode) {
    app.on_key(KeyEvent::from(code)).expect("key handled");
}

fn type_text(app: &mut App, s: &str) {
    for c in s.chars() {
        press(app, KeyCode::Char(c));
    }
}

#[test]
fn whole_screen_of_the_fixture() {
    let mut a = app(3, 4);
    let expected = Buffer::with_lines([
        " slug view  fixture  0.000000s..0.003830s (3.83ms)  events: 144 in view         ",
        "time            |0ns          |837.8us      |1.68ms       |2.51ms       |3.35ms ",
        ">n0/s0          ███▒            ▒███░            ▓███             ███▒          ",
        "                S  v4.0KiB      │   n            │  v4.0KiB       │  v4.0KiB    ",
        " n0/s1               ████░           ▒████            ▓███▓            ████▒    ",
        "                   ^ S   v4.0KiB    ^│   v4.0KiB     ^│   v     X    ^ │   v    ",
        " n1/s2                    ███▒            ▒███░            ▓███             ███▒",
        "                         ^S               │               ^│               ^│   ",
        "links: bytes over time; achieved = bytes / time in flight, in view              ",
        "s0>s1 204.8MB/s    █                █               ▆▃               █          ",
        "s1>s2 204.8MB/s          █               ▃▆               █                █    ",
        "lanes: density per column; off-cpu p preempted f futex i io s sleep y syscall b ",
        "s0 samples      ▄▄▄▄            ▄▄ █             ▄▄▄▄             ▄▄▄▄          ",
        "s1 samples           ▄▄ █            ▄ ▄▄▄            ▄ ▄▄▄            ▄▄ ▄▄    ",
        "s2 samples                ▄▄▄▄            ▄▄ █             ▄▄▄▄             ▄▄▄▄",
        "s0 faults          █                                                            ",
        "s1 faults                █                                                      ",
        "s2 faults                    █                                                  ",
        "s0 t7              f                f               ff               f          ",
        "s1 t7                    f               ff               ff               f    ",
        "s2 t7                        f                f               ff               f",
        "                                                                                ",
        "                                                                                ",
        "q quit  ? help  L legend  w/s zoom  a/d pan  up/down track  n/p event  / filter",
    ]);
    assert_eq!(screen(&mut a, 80, 24), expected);
}

#[test]
fn overview_from_the_index_when_too_many_events_are_in_view() {
    let timeline = Timeline::new(Box::new(fixture::pipeline(2, 4, 8))).with_detail_limit(10);
    let mut a = App::new(timeline, "big");
    let lines = text(&screen(&mut a, 80, 20));
    assert!(lines[0].contains("overview from index"), "{}", lines[0]);
    assert!(
        lines[2].contains('░') || lines[2].contains('█'),
        "{}",
        lines[2]
    );
    assert!(
        lines[6].starts_with("links: zoom in (w) to see transfers"),
        "{}",
        lines[6]
    );
    press(&mut a, KeyCode::Char('n'));
    assert!(a.selection.is_none());
    assert!(a.message.as_deref().is_some_and(|m| m.contains("zoom in")));
    press(&mut a, KeyCode::Char('/'));
    type_text(&mut a, "kernel:gemm");
    press(&mut a, KeyCode::Enter);
    let lines = text(&screen(&mut a, 140, 20));
    assert!(
        lines[0].contains("name filters apply when zoomed in"),
        "{}",
        lines[0]
    );
}

#[test]
fn too_small_terminal_gets_a_message_not_a_garbled_screen() {
    let mut a = app(2, 2);
    let lines = [
        "terminal too small: 40x6, slug view",
        "needs 60x16 — enlarge the window or",
        "press q",
        "",
        "",
        "",
    ];
    let expected = Buffer::with_lines(lines.iter().map(|l| format!("{l:<40}")));
    assert_eq!(screen(&mut a, 40, 6), expected);
}

#[test]
fn help_overlay_lists_keys_and_any_key_closes_it() {
    let mut buf = Buffer::empty(Rect::new(0, 0, 78, 36));
    let kernels = vec!["gemm".to_string()];
    help::HelpView { kernels: &kernels }.render(buf.area, &mut buf);
    let lines = text(&plain(&buf));
    assert_eq!(lines[0], format!("┌ keys {}┐", "─".repeat(70)));
    assert_eq!(lines[1], format!("│{:<76}│", "       w + =  zoom in"));
    assert_eq!(
        lines[14],
        format!(
            "│{:<76}│",
            "           /  filter: kind:K kernel:K ep:E words"
        )
    );
    // The legend follows the keys.
    assert!(lines.iter().any(|l| l.contains("S  snapshot")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("█  gemm")), "{lines:?}");
    let mut a = app(2, 2);
    press(&mut a, KeyCode::Char('?'));
    assert_eq!(a.mode, Mode::Help);
    press(&mut a, KeyCode::Char('x'));
    assert_eq!(a.mode, Mode::Timeline);
}

#[test]
fn legend_explains_every_mark_and_groups_kernels_by_colour() {
    let kernels: Vec<String> = [
        "attn", "gemm", "rmsnorm", "softmax", "q_proj", "k_proj", "down",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    let lines: Vec<String> = legend::lines(&kernels)
        .iter()
        .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
        .collect();
    for glyph in ["S", "^", "v", "│", "┊", "!", "X", "*", "y", "n"] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{glyph}  "))),
            "{glyph} missing from {lines:?}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("p preempted f futex")));
    // One line per colour: every kernel appears once, and kernels on one line share a colour.
    let colour_lines: Vec<&String> = lines.iter().filter(|l| l.starts_with("█  ")).collect();
    let mut seen: Vec<&str> = Vec::new();
    let mut colours = Vec::new();
    for l in &colour_lines {
        let names: Vec<&str> = l[("█  ".len())..].split(' ').collect();
        let c = style::kernel_color(names[0]);
        assert!(names.iter().all(|n| style::kernel_color(n) == c), "{l}");
        assert!(!colours.contains(&c), "colour {c:?} on two lines");
        colours.push(c);
        seen.extend(names);
    }
    seen.sort_unstable();
    let mut want: Vec<&str> = kernels.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(seen, want);
    assert!(legend::lines(&[]).iter().any(|l| {
        l.spans
            .iter()
            .any(|s| s.content.contains("no kernels in view"))
    }));
}

#[test]
fn l_toggles_the_legend_which_names_the_kernels_in_view() {
    let mut a = app(3, 4);
    press(&mut a, KeyCode::Char('L'));
    assert_eq!(a.mode, Mode::Legend);
    let lines = text(&plain(&screen(&mut a, 100, 40)));
    assert!(
        lines.iter().any(|l| l.contains("legend (any key closes)")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("step boundary")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("gemm")), "{lines:?}");
    press(&mut a, KeyCode::Char('L'));
    assert_eq!(a.mode, Mode::Timeline);
    press(&mut a, KeyCode::Char('t'));
    press(&mut a, KeyCode::Char('L'));
    assert_eq!(a.mode, Mode::Legend);
}

fn transfer() -> TraceEvent {
    let mut x = fixture::transfer(7, (0, 1), 4096, (1_000_000, 1_020_000), Direction::Recv);
    x.record.src_arena = 1;
    x.record.dst_arena = 2;
    x.record.src_offset = 64;
    x.record.dst_offset = 128;
    x.record.hash = 0xab;
    TraceEvent::Transfer(Box::new(x))
}

#[test]
fn detail_pane_shows_every_field_of_a_transfer() {
    let sel = Selection {
        endpoint: 1,
        event: transfer(),
    };
    let eps = fixture::endpoints(2);
    let mut buf = Buffer::empty(Rect::new(0, 0, 40, 20));
    detail::DetailView::new(&sel, &eps, &fixture::names(), 0).render(buf.area, &mut buf);
    let lines = [
        " event (esc clears)",
        "endpoint n0/s1",
        "kind transfer",
        "id 7",
        "src n0/s0",
        "dst n0/s1",
        "bytes 4096 (4.0KiB)",
        "post 0.001000s",
        "complete 0.001020s",
        "latency 20.0us",
        "achieved 204.8MB/s",
        "src arena 1",
        "dst arena 2",
        "src offset 64",
        "dst offset 128",
        "hash 000000000000000000000000000000ab",
        "transport tcp",
        "payload hash only",
        "logged by receiver",
        "",
    ];
    let expected = Buffer::with_lines(lines.iter().map(|l| format!("│{l:<39}")));
    assert_eq!(plain(&buf), expected);
}

#[test]
fn detail_pane_shows_an_mpi_transfer_s_communicator_ranks_and_tags() {
    let mut event = transfer();
    if let TraceEvent::Transfer(x) = &mut event {
        x.record.transport = slug_schema::Transport::Mpi;
    }
    let sel = Selection { endpoint: 1, event };
    let table = slug_schema::MpiTable {
        communicator: "MPI_COMM_WORLD".into(),
        inline_limit: 1024,
        links: vec![slug_schema::MpiLink {
            link: 0,
            source_rank: 0,
            dest_rank: 1,
            header_tag: 0,
            payload_tag: 1,
        }],
    };
    let eps = fixture::endpoints(2);
    let mut buf = Buffer::empty(Rect::new(0, 0, 40, 26));
    detail::DetailView::new(&sel, &eps, &fixture::names(), 0)
        .with_mpi(Some(&table))
        .render(buf.area, &mut buf);
    let text = plain(&buf);
    let rows: Vec<String> = (0..26)
        .map(|y| {
            (1..40)
                .map(|x| text[(x, y)].symbol())
                .collect::<String>()
                .trim_end()
                .to_string()
        })
        .collect();
    for want in [
        "transport mpi",
        "communicator MPI_COMM_WORLD",
        "source_rank 0",
        "dest_rank 1",
        "tag 0",
        "payload_tag 1",
    ] {
        assert!(rows.iter().any(|r| r == want), "{want}: {rows:#?}");
    }
}

#[test]
fn link_panel_draws_bandwidth_and_achieved_rate() {
    let window = Window {
        range: crate::state::event::TimeRange::new(0, 8_000),
        columns: 8,
        detail: true,
        events_in_view: 2,
        tracks: Vec::new(),
        flows: Vec::new(),
        links: vec![LinkBins {
            src: 0,
            dst: 1,
            // 1550 bytes in view of a 3100-byte total: half of one transfer lies outside.
            bytes: vec![0.0, 100.0, 200.0, 400.0, 800.0, 0.0, 0.0, 50.0],
            transfers: 2,
            total_bytes: 3100,
            busy: 5_000,
        }],
    };
    let eps = fixture::endpoints(2);
    let mut buf = Buffer::empty(Rect::new(0, 0, 24, 2));
    (&links::LinksView {
        window: &window,
        endpoints: &eps,
    })
        .render(buf.area, &mut buf);
    let expected = Buffer::with_lines(["links: bytes over time; ", "s0>s1 310.0MB/s  ▁▂▄█  ▁"]);
    assert_eq!(plain(&buf), expected);
}

#[test]
fn filter_prompt_hides_other_endpoints() {
    let mut a = app(3, 2);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('/'));
    assert_eq!(a.mode, Mode::Prompt(crate::state::app::PromptKind::Filter));
    type_text(&mut a, "ep:s1");
    let lines = text(&screen(&mut a, 80, 24));
    assert!(
        lines[23].starts_with("filter (kind:K kernel:K ep:E words): ep:s1"),
        "{}",
        lines[23]
    );
    press(&mut a, KeyCode::Enter);
    let lines = text(&screen(&mut a, 80, 24));
    assert!(lines[0].contains("filter: ep:s1"), "{}", lines[0]);
    assert!(lines[2].starts_with(">n0/s1"), "{}", lines[2]);
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("n0/s0") || l.contains("n1/s2"))
    );
    press(&mut a, KeyCode::Char('/'));
    assert_eq!(a.input, "ep:s1", "the prompt starts from the active filter");
    for _ in 0..5 {
        press(&mut a, KeyCode::Backspace);
    }
    type_text(&mut a, "kind:nope");
    press(&mut a, KeyCode::Enter);
    assert!(
        a.message
            .as_deref()
            .is_some_and(|m| m.contains("unknown kind `nope`"))
    );
}

#[test]
fn jump_to_step_and_time() {
    let mut a = app(2, 6);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char(':'));
    type_text(&mut a, "3");
    press(&mut a, KeyCode::Enter);
    let step3 = 3 * fixture::STEP_NS;
    assert!(
        a.view.start_ns <= step3 && step3 < a.view.end_ns,
        "{:?}",
        a.view
    );
    assert!(a.view.len() <= 2 * fixture::STEP_NS);
    press(&mut a, KeyCode::Char('g'));
    type_text(&mut a, "5ms");
    press(&mut a, KeyCode::Enter);
    let mid = a.view.start_ns + a.view.len() / 2;
    assert!(
        mid.abs_diff(5_000_000) < a.view.len() / 2 + 1,
        "{:?}",
        a.view
    );
    press(&mut a, KeyCode::Char(':'));
    type_text(&mut a, "99");
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.message.as_deref(), Some("step 99 not found on n0/s0"));
}

#[test]
fn zoom_pan_and_select_events_with_keys_and_mouse() {
    let mut a = app(2, 4);
    screen(&mut a, 80, 24);
    let full = a.view;
    press(&mut a, KeyCode::Char('w'));
    assert_eq!(a.view.len(), full.len() / 2);
    press(&mut a, KeyCode::Char('d'));
    assert!(a.view.start_ns > full.start_ns);
    press(&mut a, KeyCode::Char('-'));
    assert_eq!(a.view, full);
    press(&mut a, KeyCode::Down);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('n'));
    let sel = a.selection.clone().expect("an event is selected");
    assert_eq!(sel.endpoint, 1);
    press(&mut a, KeyCode::Char('n'));
    let next = a.selection.clone().expect("still selected");
    assert!(next.event.start() >= sel.event.start());
    press(&mut a, KeyCode::Esc);
    assert!(a.selection.is_none());
    let scroll = |kind| {
        Event::Mouse(MouseEvent {
            kind,
            column: 20,
            row: 2,
            modifiers: KeyModifiers::NONE,
        })
    };
    screen(&mut a, 80, 24);
    a.handle(&scroll(MouseEventKind::ScrollUp));
    assert!(a.view.len() < full.len());
    screen(&mut a, 80, 24);
    a.handle(&scroll(MouseEventKind::Down(MouseButton::Left)));
    let clicked = a.selection.clone().expect("click selects");
    assert_eq!(clicked.endpoint, 0);
    let t = a.view.start_ns + a.view.len() * 4 / 64;
    let slack = a.view.len() / 32;
    assert!(
        clicked.event.start() <= t + slack && clicked.event.end() + slack >= t,
        "{:?} not under the pointer at {t}",
        clicked.event
    );
    let lines = text(&screen(&mut a, 100, 24));
    assert!(lines[1].contains("event (esc clears)"), "{}", lines[1]);
}

#[test]
fn stats_view_answers_where_time_went() {
    let mut a = app(3, 5);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('t'));
    assert_eq!(a.mode, Mode::Stats);
    let lines = text(&screen(&mut a, 80, 24));
    assert!(
        lines[1].starts_with("computing statistics: reading all 178 events"),
        "{}",
        lines[1]
    );
    assert!(a.compute_pending().expect("computes"));
    assert!(!a.compute_pending().expect("already computed"));
    let lines = text(&screen(&mut a, 80, 24));
    assert_eq!(
        lines[1].trim_end(),
        "steady state (first kernel, transfer or step on); setup before it apart"
    );
    assert_eq!(
        lines[2].trim_end(),
        "endpoint          setup   steady  compute  waiting     idle  kernels  steps"
    );
    // The fixture's stages start with their first step: no setup.
    assert!(lines[3].starts_with("n0/s0"), "{}", lines[3]);
    assert!(lines[3].contains("     0ns "), "{}", lines[3]);
    assert!(
        lines.iter().any(|l| l.starts_with("n0/s0>n0/s1")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("step time over 5 steps, 4 measured")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  min 1.00ms  p50 1.00ms")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("bottleneck: n0/s1")),
        "{lines:?}"
    );
    // Where each stage waited, from the eBPF off-CPU intervals: 5 steps of 30us in futex.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("n0/s1          futex 150.0us (5x)")),
        "{lines:?}"
    );
    // The per-kernel table follows, below the first screen: scroll to it.
    for _ in 0..3 {
        press(&mut a, KeyCode::PageDown);
    }
    let lines = text(&screen(&mut a, 80, 24));
    let at = lines
        .iter()
        .position(|l| {
            l.starts_with("n0/s1 (busy 1.25ms over its threads; 1.25ms wall time with a kernel")
        })
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(
        lines[at + 1].trim_end(),
        "  gemm            750.0us         5   60.0%"
    );
    assert_eq!(
        lines[lines.len() - 2].trim(),
        "rmsnorm         100.0us         5   10.0%",
        "scrolled no further than the last line"
    );
    press(&mut a, KeyCode::Home);
    let lines = text(&screen(&mut a, 80, 24));
    assert!(lines[1].starts_with("steady state"), "{}", lines[1]);
    press(&mut a, KeyCode::Char('t'));
    assert_eq!(a.mode, Mode::Timeline);
}

#[test]
fn divergence_report_is_highlighted_and_selected() {
    let mut a = app(3, 4);
    let report: crate::state::divergence::Divergence = serde_json::from_value(serde_json::json!({
        "endpoint": "n0/s1", "step": 2, "layer": 1, "kernel": "gemm", "transfer_id": 7,
        "offset": 12, "expected": "0x1", "got": "0x2", "later_differing": 3
    }))
    .expect("report parses");
    a.set_divergence(report).expect("placed");
    let sel = a
        .selection
        .clone()
        .expect("the differing transfer is selected");
    assert!(matches!(&sel.event, TraceEvent::Transfer(x) if x.id() == 7));
    let lines = text(&screen(&mut a, 100, 24));
    assert!(
        lines[1].starts_with("first divergence: n0/s1 step 2 layer 1 kernel gemm transfer #7 @12"),
        "{}",
        lines[1]
    );
    assert!(lines.iter().any(|l| l.contains('!')), "{lines:?}");
}

#[test]
fn damaged_logs_are_reported_on_the_first_screen() {
    let mut src = fixture::pipeline(2, 2, 8);
    src.set_health(
        1,
        crate::state::source::LogHealth {
            lost_events: 40,
            truncated_bytes: 999,
            note: "log not closed (no index footer); 999 bytes cut short, about 40 events lost"
                .to_string(),
        },
    );
    let mut a = App::new(Timeline::new(Box::new(src)), "damaged");
    let lines = text(&screen(&mut a, 100, 20));
    assert_eq!(
        lines[19].trim_end(),
        "n0/s1: log not closed (no index footer); 999 bytes cut short, about 40 events lost"
    );
}

#[test]
fn kernel_spans_are_coloured_by_kernel() {
    let mut a = app(1, 1);
    // Zoom so that the first step's gemm (20us..120us) covers whole columns.
    a.set_view(0, 200_000);
    let mut term = Terminal::new(TestBackend::new(80, 20)).expect("test backend");
    draw_frame(&mut term, &mut a).expect("draws");
    let buf = term.backend().buffer();
    let axis = a.window.as_ref().expect("window built");
    let x0 = crate::view::LABEL_WIDTH;
    let col = |t| x0 + axis.column_of(t) as u16;
    let cell = |t| &buf[(col(t), 2)];
    assert_eq!(cell(60_000).symbol(), "█");
    assert_eq!(cell(60_000).fg, crate::view::style::kernel_color("gemm"));
    assert_eq!(
        cell(140_000).fg,
        crate::view::style::kernel_color("attention")
    );
    assert_ne!(
        crate::view::style::kernel_color("gemm"),
        crate::view::style::kernel_color("attention"),
        "the fixture's kernels get distinct colours"
    );
}

#[test]
fn an_empty_trace_draws_without_events() {
    let src = crate::state::source::MemorySource::new(fixture::endpoints(2), Vec::new(), 8);
    let mut a = App::new(Timeline::new(Box::new(src)), "empty");
    let lines = text(&screen(&mut a, 80, 20));
    assert!(lines[0].contains("events: 0 in view"), "{}", lines[0]);
    assert!(lines[2].starts_with(">n0/s0"), "{}", lines[2]);
    press(&mut a, KeyCode::Char('w'));
    press(&mut a, KeyCode::Char('n'));
    press(&mut a, KeyCode::Char('t'));
    assert!(a.compute_pending().expect("stats of nothing"));
    let lines = text(&screen(&mut a, 80, 20));
    assert!(
        lines.iter().any(|l| l.starts_with("bottleneck: none")),
        "{lines:?}"
    );
}

#[test]
fn an_undecodable_frame_is_skipped_and_reported() {
    let src = fixture::FailingSource {
        inner: fixture::pipeline(2, 4, 8),
        bad: (1, 1),
    };
    let mut a = App::new(Timeline::new(Box::new(src)), "bad frame");
    let lines = text(&screen(&mut a, 100, 20));
    assert!(
        lines[19].starts_with(
            "skipped unreadable data: endpoint n0/s1: frame 1 cannot be decoded: checksum mismatch"
        ),
        "{}",
        lines[19]
    );
    assert!(
        lines[2].contains('█') && lines[4].contains('█'),
        "both tracks still drawn"
    );
    press(&mut a, KeyCode::Char(':'));
    type_text(&mut a, "3");
    press(&mut a, KeyCode::Enter);
    assert!(
        a.message
            .as_deref()
            .is_some_and(|m| m.starts_with("step 3 on n0/s0 starts at"))
    );
    press(&mut a, KeyCode::Char('t'));
    assert!(a.compute_pending().expect("stats skip the bad frame"));
    assert_eq!(a.stats.as_ref().map(|s| s.unreadable_frames), Some(1));
}

#[test]
fn next_match_is_found_beyond_the_view() {
    let mut a = app(2, 10);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('/'));
    type_text(&mut a, "kernel:attention");
    press(&mut a, KeyCode::Enter);
    // A view of the first step only.
    a.set_view(0, 400_000);
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('n'));
    let first = a.selection.clone().expect("first attention selected");
    assert!(
        matches!(&first.event, TraceEvent::KernelSpan(k) if a.timeline.source().names().get(k.kernel) == "attention" && k.step == 0)
    );
    press(&mut a, KeyCode::Char('n'));
    let second = a
        .selection
        .clone()
        .expect("next attention found beyond the view");
    assert!(
        matches!(&second.event, TraceEvent::KernelSpan(k) if a.timeline.source().names().get(k.kernel) == "attention" && k.step == 1)
    );
    assert!(
        a.view.touches(second.event.start(), second.event.start()),
        "the view followed it"
    );
    screen(&mut a, 80, 24);
    press(&mut a, KeyCode::Char('p'));
    assert_eq!(a.selection, Some(first));
    for _ in 0..12 {
        screen(&mut a, 80, 24);
        press(&mut a, KeyCode::Char('n'));
    }
    assert_eq!(
        a.message.as_deref(),
        Some("no more matching events on this track")
    );
}

#[test]
fn transfers_between_distant_tracks_are_drawn_through_the_tracks_between() {
    let x = fixture::transfer(9, (2, 0), 8, (500_000, 520_000), Direction::Send);
    let mut events = fixture::pipeline_events(3, 1);
    events[2].push(TraceEvent::Transfer(Box::new(x)));
    let src = crate::state::source::MemorySource::new(fixture::endpoints(3), events, 64);
    let mut a = App::new(Timeline::new(Box::new(src)), "token back");
    let b = screen(&mut a, 80, 20);
    let c = crate::view::LABEL_WIDTH + a.window.as_ref().expect("window").column_of(500_000) as u16;
    let column: String = (1..8).map(|y| b[(c, y)].symbol().to_string()).collect();
    // Rows: axis, s0 kernels, s0 marks (arrival), s1 kernels, s1 marks, s2 kernels, s2 marks (post).
    assert_eq!(
        column, "   █┊┊v",
        "line from s2's post up to s0, over blank cells only"
    );
}

#[test]
fn a_filter_that_matches_nothing_says_so() {
    let mut a = app(2, 2);
    press(&mut a, KeyCode::Char('/'));
    type_text(&mut a, "kernel:nosuchkernel");
    press(&mut a, KeyCode::Enter);
    let msg = a.message.clone().unwrap_or_default();
    assert!(
        msg.starts_with("0 matches for `kernel:nosuchkernel` in the whole trace"),
        "{msg}"
    );
    a.message = None;
    press(&mut a, KeyCode::Char('/'));
    for _ in "kernel:nosuchkernel".chars() {
        press(&mut a, KeyCode::Backspace);
    }
    type_text(&mut a, "kernel:attention");
    press(&mut a, KeyCode::Enter);
    assert!(
        !a.message
            .as_deref()
            .unwrap_or_default()
            .starts_with("0 matches"),
        "{:?}",
        a.message
    );
}

#[test]
fn tied_stages_say_no_single_bottleneck() {
    use crate::state::stats::{EndpointStats, TraceStats};
    let ep = |endpoint, compute| EndpointStats {
        endpoint,
        active: 2_000,
        compute,
        ..EndpointStats::default()
    };
    let endpoints = fixture::endpoints(4);
    let mut stats = TraceStats {
        endpoints: vec![ep(0, 1_000), ep(1, 990), ep(2, 1_000), ep(3, 970)],
        ..TraceStats::default()
    };
    let line = |stats: &TraceStats| -> String {
        crate::view::stats::StatsView::new(stats, &endpoints)
            .lines()
            .iter()
            .map(|l| {
                l.spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect::<String>()
            })
            .find(|l| l.starts_with("bottleneck:"))
            .expect("a bottleneck line")
    };
    assert_eq!(
        line(&stats),
        "bottleneck: no single bottleneck (stages within 5%: n0/s0, n1/s2, n0/s1, n1/s3)"
    );
    stats.endpoints[0].compute = 1_200;
    assert_eq!(
        line(&stats),
        "bottleneck: n0/s0 (computes 60.0% of its time; the pipeline runs at its pace)"
    );
}

#[test]
fn link_label_and_stats_use_one_bandwidth_definition() {
    use crate::state::event::format_bandwidth;
    use crate::state::stats::TraceStats;
    let mut a = app(3, 5);
    let lines = text(&screen(&mut a, 120, 30));
    let stats = TraceStats::compute(a.timeline.source()).expect("stats");
    let window = a.window.as_ref().expect("drawn");
    assert!(window.detail && !window.links.is_empty());
    for l in &window.links {
        let s = stats
            .links
            .iter()
            .find(|s| (s.src, s.dst) == (l.src, l.dst))
            .expect("the stats know the link");
        // The whole trace is in view: the lane's bytes and in-flight time are the trace's.
        assert_eq!(l.bytes.iter().sum::<f64>().round() as u64, s.bytes);
        assert_eq!(l.busy, s.busy);
        let rate = format_bandwidth(s.bytes, s.busy);
        let label = format!("s{}>s{} {rate}", l.src, l.dst);
        assert!(
            lines.iter().any(|line| line.starts_with(&label)),
            "{label} in {lines:?}"
        );
    }
}
