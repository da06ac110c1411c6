// A guard entered into a scope is closed when the scope ends: a reference to it cannot
// be returned from the body.
fn main() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let _escaped = custodian::scope(|s| Ok::<_, std::io::Error>(s.enter(file)));
}
