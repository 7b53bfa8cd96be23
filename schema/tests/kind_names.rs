//! One name per event kind everywhere: the docs list the kinds by [`EventKind::name`], the same
//! names `slug info`, the viewer's `/kind:` filter and the exports take from it.

use std::path::Path;

use slug_schema::EventKind;

/// Checks that `doc` lists every kind's name, in `EventKind::ALL` order, as one list: each name
/// follows the previous one within a few words.
fn lists_every_kind(doc: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(doc);
    let text = std::fs::read_to_string(&path).expect("doc reads");
    let quoted = |k: EventKind| format!("`{}`", k.name());
    let mut at = text
        .find(&quoted(EventKind::ALL[0]))
        .unwrap_or_else(|| panic!("{doc} never names `{}`", EventKind::ALL[0].name()));
    for pair in EventKind::ALL.windows(2) {
        let next = quoted(pair[1]);
        let gap = text[at..].find(&next).unwrap_or_else(|| {
            panic!(
                "{doc} does not list `{}` after `{}`",
                pair[1].name(),
                pair[0].name()
            )
        });
        assert!(
            gap < 40,
            "{doc}: `{}` is not next to `{}` in the kind list",
            pair[1].name(),
            pair[0].name()
        );
        at += gap;
    }
}

#[test]
fn readme_and_format_spec_name_every_kind_as_the_schema_does() {
    lists_every_kind("README.md");
    lists_every_kind("docs/FORMAT.md");
}
