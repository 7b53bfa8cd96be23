//! Terminal timeline viewer over a trace, and export to Perfetto / Chrome JSON.
