//! A budget for constant folding: minijinja computes constant expressions while it compiles a
//! template, before fuel or any guard applies, so the parsed template is walked first and one
//! whose constants would cost too much to compute is refused.

use std::collections::HashMap;

use minijinja::machinery::ast;
use minijinja::{Error, ErrorKind, Value};

use super::GuardState;

/// What minijinja may compute while compiling a template: the sizes (in the units of
/// `value_limit`) of the operands and results of the operations it folds, each time it folds
/// them. Real templates fold a few short strings (`'=' * 80`).
const FOLDING_BUDGET: u64 = 1 << 20;

/// Refuses a template whose constant expressions would cost minijinja much work to fold while
/// compiling, before anything is charged: `[0] * 10**8` folds into a 100M-item list, a sum of
/// 33 of them is materialized, and comparing two of them walks them all. Folding follows
/// minijinja's code generator, which folds an expression (`Expr::as_const`) before compiling
/// it and again for every enclosing expression it compiles; this walks the parsed template the
/// same way, counting that work, and folds each operation once on its operands' values.
pub(in crate::chat_template) fn check_constant_folding(
    source: &str,
    syntax: minijinja::syntax::SyntaxConfig,
) -> Result<(), Error> {
    let template = minijinja::machinery::parse(source, "chat_template", syntax)?;
    let mut folding = Folding {
        spent: 0,
        folded: HashMap::new(),
    };
    folding.statement(&template)
}

struct Folding {
    spent: u64,
    /// Each expression's value if it is constant, and the work of folding it, by address.
    folded: HashMap<usize, (Option<Value>, u64)>,
}

impl Folding {
    fn statement(&mut self, stmt: &ast::Stmt<'_>) -> Result<(), Error> {
        use ast::Stmt as S;
        match stmt {
            S::Template(t) => self.statements(&t.children),
            S::EmitExpr(e) => self.compile(&e.expr),
            S::EmitRaw(_) | S::Continue(_) | S::Break(_) => Ok(()),
            S::ForLoop(f) => {
                self.compile(&f.target)?;
                self.compile(&f.iter)?;
                if let Some(filter) = &f.filter_expr {
                    self.compile(filter)?;
                }
                self.statements(&f.body)?;
                self.statements(&f.else_body)
            }
            S::IfCond(i) => {
                self.compile(&i.expr)?;
                self.statements(&i.true_body)?;
                self.statements(&i.false_body)
            }
            S::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.compile(target)?;
                    self.compile(value)?;
                }
                self.statements(&w.body)
            }
            S::Set(s) => {
                self.compile(&s.target)?;
                self.compile(&s.expr)
            }
            S::SetBlock(s) => {
                self.compile(&s.target)?;
                if let Some(filter) = &s.filter {
                    self.compile(filter)?;
                }
                self.statements(&s.body)
            }
            S::AutoEscape(a) => {
                self.compile(&a.enabled)?;
                self.statements(&a.body)
            }
            S::FilterBlock(f) => {
                self.compile(&f.filter)?;
                self.statements(&f.body)
            }
            S::Block(b) => self.statements(&b.body),
            S::Import(i) => {
                self.compile(&i.expr)?;
                self.compile(&i.name)
            }
            S::FromImport(i) => {
                self.compile(&i.expr)?;
                for (name, alias) in &i.names {
                    self.compile(name)?;
                    if let Some(alias) = alias {
                        self.compile(alias)?;
                    }
                }
                Ok(())
            }
            S::Extends(e) => self.compile(&e.name),
            S::Include(i) => self.compile(&i.name),
            S::Macro(m) => self.macro_decl(m),
            S::CallBlock(c) => {
                self.call(&c.call)?;
                self.macro_decl(&c.macro_decl)
            }
            S::Do(d) => self.call(&d.call),
        }
    }

    fn statements(&mut self, stmts: &[ast::Stmt<'_>]) -> Result<(), Error> {
        stmts.iter().try_for_each(|s| self.statement(s))
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) -> Result<(), Error> {
        for e in m.args.iter().chain(&m.defaults) {
            self.compile(e)?;
        }
        self.statements(&m.body)
    }

    fn call(&mut self, call: &ast::Call<'_>) -> Result<(), Error> {
        self.compile(&call.expr)?;
        self.args(&call.args)
    }

    fn args(&mut self, args: &[ast::CallArg<'_>]) -> Result<(), Error> {
        for arg in args {
            match arg {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.compile(e)?,
            }
        }
        Ok(())
    }

    /// Compiling an expression folds it; if it is not constant, its parts are compiled.
    fn compile(&mut self, expr: &ast::Expr<'_>) -> Result<(), Error> {
        use ast::Expr as E;
        let (value, work) = self.fold(expr)?;
        self.spend(work)?;
        if value.is_some() {
            return Ok(());
        }
        match expr {
            E::Var(_) | E::Const(_) => Ok(()),
            E::Slice(s) => {
                self.compile(&s.expr)?;
                for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.compile(e)?;
                }
                Ok(())
            }
            E::UnaryOp(u) => self.compile(&u.expr),
            E::BinOp(b) => {
                self.compile(&b.left)?;
                self.compile(&b.right)
            }
            E::Compare(c) => {
                self.compile(&c.expr)?;
                c.ops.iter().try_for_each(|op| self.compile(&op.expr))
            }
            E::IfExpr(i) => {
                self.compile(&i.test_expr)?;
                self.compile(&i.true_expr)?;
                match &i.false_expr {
                    Some(e) => self.compile(e),
                    None => Ok(()),
                }
            }
            E::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.compile(e)?;
                }
                self.args(&f.args)
            }
            E::Test(t) => {
                self.compile(&t.expr)?;
                self.args(&t.args)
            }
            E::GetAttr(g) => self.compile(&g.expr),
            E::GetItem(g) => {
                self.compile(&g.expr)?;
                self.compile(&g.subscript_expr)
            }
            E::Call(c) => self.call(c),
            E::List(l) => l.items.iter().try_for_each(|e| self.compile(e)),
            E::Tuple(t) => t.items.iter().try_for_each(|e| self.compile(e)),
            E::Map(m) => m
                .keys
                .iter()
                .chain(&m.values)
                .try_for_each(|e| self.compile(e)),
        }
    }

    /// `expr.as_const()` and the work it takes, computed once per expression: operations are
    /// folded on their operands' folded values, so that nothing is folded twice here.
    fn fold(&mut self, expr: &ast::Expr<'_>) -> Result<(Option<Value>, u64), Error> {
        use ast::Expr as E;
        let address = expr as *const ast::Expr<'_> as usize;
        if let Some(known) = self.folded.get(&address) {
            return Ok(known.clone());
        }
        let span = expr.span();
        let constant =
            |value: Value| ast::Expr::Const(ast::Spanned::new(ast::Const { value }, span));
        let folded = match expr {
            E::Const(c) => (Some(c.value.clone()), 0),
            // Only lists of literals fold, without folding their items again.
            E::List(_) | E::Tuple(_) | E::Map(_) => {
                let value = expr.as_const();
                let work = value.as_ref().map_or(0, |v| v.len().unwrap_or(0) as u64);
                (value, work)
            }
            E::UnaryOp(u) => {
                let (operand, work) = self.fold(&u.expr)?;
                let value = operand.and_then(|v| {
                    ast::Expr::UnaryOp(ast::Spanned::new(
                        ast::UnaryOp {
                            op: match u.op {
                                ast::UnaryOpKind::Not => ast::UnaryOpKind::Not,
                                ast::UnaryOpKind::Neg => ast::UnaryOpKind::Neg,
                            },
                            expr: constant(v),
                        },
                        span,
                    ))
                    .as_const()
                });
                (value, work)
            }
            E::BinOp(b) => {
                let (left, left_work) = self.fold(&b.left)?;
                let (right, right_work) = self.fold(&b.right)?;
                let mut work = left_work.saturating_add(right_work);
                let value = match (left, right) {
                    (Some(left), Some(right)) => {
                        work = work
                            .saturating_add(self.size(&left)?)
                            .saturating_add(self.size(&right)?);
                        let value = ast::Expr::BinOp(ast::Spanned::new(
                            ast::BinOp {
                                op: b.op,
                                left: constant(left),
                                right: constant(right),
                            },
                            span,
                        ))
                        .as_const();
                        if let Some(value) = &value {
                            work = work.saturating_add(self.size(value)?);
                        }
                        value
                    }
                    _ => None,
                };
                (value, work)
            }
            // Folding stops at the first operand that is not constant.
            E::Compare(c) => {
                let (first, mut work) = self.fold(&c.expr)?;
                let mut operands = Vec::new();
                let mut constant_ops = Vec::new();
                if let Some(first) = first {
                    work = work.saturating_add(self.size(&first)?);
                    operands.push(first);
                    for op in &c.ops {
                        let (operand, operand_work) = self.fold(&op.expr)?;
                        work = work.saturating_add(operand_work);
                        let Some(operand) = operand else {
                            break;
                        };
                        work = work.saturating_add(self.size(&operand)?);
                        constant_ops.push(ast::CompareOp {
                            op: op.op,
                            expr: constant(operand),
                        });
                    }
                }
                let value = match operands.pop() {
                    Some(first) if constant_ops.len() == c.ops.len() => {
                        ast::Expr::Compare(ast::Spanned::new(
                            ast::Compare {
                                expr: constant(first),
                                ops: constant_ops,
                            },
                            span,
                        ))
                        .as_const()
                    }
                    _ => None,
                };
                (value, work)
            }
            E::Var(_)
            | E::Slice(_)
            | E::IfExpr(_)
            | E::Filter(_)
            | E::Test(_)
            | E::GetAttr(_)
            | E::GetItem(_)
            | E::Call(_) => (None, 0),
        };
        self.folded.insert(address, folded.clone());
        Ok(folded)
    }

    fn spend(&mut self, work: u64) -> Result<(), Error> {
        self.spent = self.spent.saturating_add(work);
        if self.spent > FOLDING_BUDGET {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "the template's constant expressions are too large to compute (a constant \
                 list repeated or joined many times, or compared)",
            ));
        }
        Ok(())
    }

    /// A folded value's size, walking it only as far as the budget allows.
    fn size(&mut self, value: &Value) -> Result<u64, Error> {
        let mut state = GuardState::new(FOLDING_BUDGET.saturating_sub(self.spent));
        match state.visit(value, 0, false, false) {
            Ok((_, measure)) => Ok(measure.bytes),
            Err(_) => self.spend(u64::MAX).map(|()| 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(source: &str) -> Result<(), Error> {
        check_constant_folding(source, minijinja::syntax::SyntaxConfig::default())
    }

    #[test]
    fn ordinary_constants_fold() {
        for source in [
            "{{ '=' * 80 }}",
            "{{ [1, 2, 3] + [4] }}",
            "{% if 'a' ~ 'b' == 'ab' %}yes{% endif %}",
            "{% for m in messages %}{{ m.content * 2 }}{% endfor %}",
            "{% set x = [0] * 1000 %}{{ x | length }}",
        ] {
            check(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }

    #[test]
    fn huge_constants_are_refused_before_compiling() {
        for source in [
            "{{ [0] * 10**8 }}",
            "{{ [0] * 10**6 == [0] * 10**6 }}",
            "{% macro m() %}{{ [[0] * 10**7] }}{% endmacro %}",
        ] {
            let err = check(source).expect_err(source);
            assert!(err.to_string().contains("too large"), "{source}: {err}");
        }
    }

    /// The work adds up over a template: a sum of many mid-sized constant lists runs out of
    /// budget though each part alone is within it.
    #[test]
    fn repeated_folding_adds_up() {
        let part = "([0] * 10000)";
        let sum = vec![part; 64].join(" + ");
        assert!(check(&format!("{{{{ {sum} }}}}")).is_err());
        check(&format!("{{{{ {part} }}}}")).unwrap();
    }

    #[test]
    fn a_syntax_error_is_an_error() {
        assert!(check("{{ [0] * }}").is_err());
    }
}
