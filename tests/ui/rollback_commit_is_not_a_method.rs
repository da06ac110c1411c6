// `commit` is an associated function so that it never shadows a method of the value.
fn main() {
    let r = custodian::Rollback::new(String::new(), |_| {});
    let _ = r.commit();
}
