//! Instrumenting the compiled template: each instruction of minijinja's VM that creates a value
//! or walks one gets calls to the guards around it, jumps are moved to match, and instructions
//! that would reach other templates are refused. The match names every instruction, so that one
//! added to minijinja does not compile until it is classified here.

use minijinja::machinery::{Instruction, Instructions};
use minijinja::{Error, ErrorKind, Value};

use super::{ARGS, SEAL, SET_ATTR, SPLAT_ARGS};

/// Returns `code` with the guards in place: the same instructions in the same order, jump
/// targets moved to the guards now in front of their targets.
pub(in crate::chat_template) fn instrument<'s>(
    code: &Instructions<'s>,
) -> Result<Instructions<'s>, Error> {
    let mut expanded = Vec::new();
    let mut starts = Vec::new();
    let mut next = 0u32;
    for index in 0.. {
        let Some(instruction) = code.get(index) else {
            break;
        };
        let sequence = guarded(instruction.clone())?;
        starts.push(next);
        next += sequence.len() as u32;
        expanded.push((index, sequence));
    }
    starts.push(next);
    let moved = |target: u32| starts.get(target as usize).copied().unwrap_or(next);

    let mut out = Instructions::new(code.name(), code.source());
    for (index, sequence) in expanded {
        let line = code.get_line(index).and_then(|l| u16::try_from(l).ok());
        for instruction in sequence {
            let instruction = match instruction {
                Instruction::Jump(t) => Instruction::Jump(moved(t)),
                Instruction::JumpIfFalse(t) => Instruction::JumpIfFalse(moved(t)),
                Instruction::JumpIfFalseOrPop(t) => Instruction::JumpIfFalseOrPop(moved(t)),
                Instruction::JumpIfTrueOrPop(t) => Instruction::JumpIfTrueOrPop(moved(t)),
                Instruction::Iterate(t) => Instruction::Iterate(moved(t)),
                Instruction::BuildMacro(name, t, flags) => {
                    Instruction::BuildMacro(name, moved(t), flags)
                }
                other => other,
            };
            match line {
                Some(line) => out.add_with_line(instruction, line),
                None => out.add(instruction),
            };
        }
    }
    Ok(out)
}

/// `instruction` with the guards it needs before and after it.
fn guarded(instruction: Instruction<'_>) -> Result<Vec<Instruction<'_>>, Error> {
    use Instruction as I;
    let seal = I::CallFunction(SEAL, Some(1));
    Ok(match instruction {
        // Values bigger than their fuel: lazy repetition and concatenation, slices (lazy views
        // that chain), containers of shared values.
        I::BuildList(_) | I::BuildTuple(_) | I::Add | I::Mul | I::Slice => {
            vec![instruction, seal]
        }
        // A map compares its keys as it is built.
        I::BuildMap(pairs) => {
            let values = u16::try_from(pairs.saturating_mul(2))
                .map_err(|_| Error::new(ErrorKind::InvalidOperation, "map literal too large"))?;
            let mut v = check_args(Some(values));
            v.extend([instruction, seal]);
            v
        }
        // Filters, functions, methods and macros get arguments of bounded size and no
        // namespace (a view over one would grow with it), and their results are sealed.
        I::ApplyFilter(_, args, _)
        | I::CallFunction(_, args)
        | I::CallMethod(_, args)
        | I::CallObject(args) => {
            let mut v = check_args(args);
            v.extend([instruction, seal]);
            v
        }
        // Uncharged work (comparing, hashing, a test's comparisons): the deadline is checked.
        I::Eq
        | I::Ne
        | I::Gt
        | I::Gte
        | I::Lt
        | I::Lte
        | I::CompareAndPreserve(_)
        | I::In
        | I::GetItem
        | I::PerformTest(..) => vec![instruction, seal],
        // `{% set ns.attr = value %}`: [value, ns] on the stack.
        I::SetAttr(name) => vec![
            I::LoadConst(Value::from(name)),
            I::CallFunction(SET_ATTR, Some(3)),
            I::UnpackList(2),
            instruction,
        ],
        // Other templates would run unguarded; a chat template is a single template anyway.
        I::Include(_) | I::LoadBlocks | I::ExportLocals | I::FastSuper => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "include, import and extends are not supported in chat templates",
            ))
        }
        // Charged by fuel as they go, or a bounded amount of work on guarded values.
        I::EmitRaw(_)
        | I::StoreLocal(_)
        | I::Lookup(_)
        | I::GetAttr(_)
        | I::LoadConst(_)
        | I::BuildKwargs(_)
        | I::MergeKwargs(_)
        | I::UnpackList(_)
        | I::UnpackLists(_)
        | I::Sub
        | I::Div
        | I::IntDiv
        | I::Rem
        | I::Pow
        | I::Neg
        | I::Not
        | I::StringConcat
        | I::Emit
        | I::PushLoop(_)
        | I::PushWith
        | I::Iterate(_)
        | I::PushDidNotIterate
        | I::PopFrame
        | I::PopLoopFrame
        | I::Jump(_)
        | I::JumpIfFalse(_)
        | I::JumpIfFalseOrPop(_)
        | I::JumpIfTrueOrPop(_)
        | I::PushAutoEscape
        | I::PopAutoEscape
        | I::BeginCapture(_)
        | I::EndCapture
        | I::DupTop
        | I::DiscardTop
        | I::FastRecurse
        | I::Swap
        | I::CallBlock(_)
        | I::BuildMacro(..)
        | I::Return
        | I::IsUndefined
        | I::Enclose(_)
        | I::GetClosure => vec![instruction],
    })
}

/// Checks the arguments of a call on the stack and puts them back: `args` of them, or as many
/// as the count on top of the stack says (a call with `*args`).
fn check_args<'s>(args: Option<u16>) -> Vec<Instruction<'s>> {
    match args {
        Some(0) => Vec::new(),
        // The guard returns them last first: unpacking pushes the first item last.
        Some(n) => vec![
            Instruction::CallFunction(ARGS, Some(n)),
            Instruction::UnpackList(n as usize),
        ],
        // Unpacking lists pushes their items in order, then their count.
        None => vec![
            Instruction::CallFunction(SPLAT_ARGS, None),
            Instruction::UnpackLists(1),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code<'s>(instructions: Vec<Instruction<'s>>) -> Instructions<'s> {
        let mut code = Instructions::new("t", "");
        for instruction in instructions {
            code.add(instruction);
        }
        code
    }

    fn listing(code: &Instructions<'_>) -> Vec<String> {
        (0..)
            .map_while(|i| code.get(i))
            .map(|i| format!("{i:?}"))
            .collect()
    }

    /// Guards go after the instructions that build values, and jumps still land on the
    /// instruction they aimed at (now further down).
    #[test]
    fn guards_follow_builders_and_jumps_follow_their_targets() {
        let out = instrument(&code(vec![
            Instruction::LoadConst(Value::from(1)),
            Instruction::BuildList(Some(1)),
            Instruction::Jump(4),
            Instruction::LoadConst(Value::from(2)),
            Instruction::Emit,
        ]))
        .unwrap();
        let listing = listing(&out);
        let seal = format!("{:?}", Instruction::CallFunction(SEAL, Some(1)));
        assert_eq!(listing.len(), 6, "{listing:?}");
        assert_eq!(listing[2], seal);
        assert_eq!(listing[3], format!("{:?}", Instruction::Jump(5)));
        assert_eq!(listing[5], format!("{:?}", Instruction::Emit));
    }

    /// A map literal's keys and values are checked before it is built, and the map sealed.
    #[test]
    fn a_map_literal_has_its_values_checked() {
        let listing = listing(&instrument(&code(vec![Instruction::BuildMap(2)])).unwrap());
        assert_eq!(
            listing,
            [
                format!("{:?}", Instruction::CallFunction(ARGS, Some(4))),
                format!("{:?}", Instruction::UnpackList(4)),
                format!("{:?}", Instruction::BuildMap(2)),
                format!("{:?}", Instruction::CallFunction(SEAL, Some(1))),
            ]
        );
    }

    #[test]
    fn other_templates_are_refused() {
        for instruction in [Instruction::Include(false), Instruction::LoadBlocks] {
            let err = instrument(&code(vec![instruction])).unwrap_err();
            assert!(err.to_string().contains("not supported"), "{err}");
        }
    }
}
