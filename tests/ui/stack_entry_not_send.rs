// A CleanupStack is Send, so its entries must be too: an `Rc` cannot go in.
use std::rc::Rc;

fn main() {
    let shared = Rc::new(5);
    let mut stack = custodian::CleanupStack::new();
    stack.defer(move || drop(shared));
}
