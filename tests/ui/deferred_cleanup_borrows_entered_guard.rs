// Cleanups run after the body has returned; the reference `enter` returned is valid only
// inside the body, so a cleanup cannot capture it (the guard's own `Close` impl is where
// its closing work belongs).
use std::io::Write;

fn main() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let _ = custodian::scope(|s| {
        let f = s.enter(file);
        s.defer(move || {
            let _ = f.write_all(b"late");
        });
        Ok::<_, std::io::Error>(())
    });
}
