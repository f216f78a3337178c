// The migration set is embedded by `sqlx::migrate!`; rebuild when a file is added or changed
// there (the macro alone does not notice a new file).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
