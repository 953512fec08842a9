"""FPTT written the way the authors' public code writes it, for timing only.

The regulariser is a Python sum over the parameters added to the loss (so autograd
computes its gradient), then torch.nn.utils.clip_grad_norm_, a torch optimiser
step, and the lam / w_bar post-update as a Python loop over the parameters. This
is the "reference" of ../shared/PERFORMANCE.md; fptt_fast's own readable
reference (fptt_fast.reference) computes the same numbers and is what the tests use.
"""
import torch


class AuthorsFPTT:
    def __init__(self, params, lr=1e-3, alpha=0.5, beta=0.5, rho=0.0, clip=1.0, fused=False,
                 capturable=False):
        self.params = list(params)
        kw = {"fused": True} if fused else {"capturable": True} if capturable else {"foreach": False}
        self.opt = torch.optim.Adam(self.params, lr=lr, **kw)
        self.alpha, self.beta, self.rho, self.clip = alpha, beta, rho, clip
        self.w_bar = [p.detach().clone() for p in self.params]
        self.lam = [torch.zeros_like(p) for p in self.params]

    def regularizer(self):
        r = torch.zeros((), device=self.params[0].device)
        for p, wb, lm in zip(self.params, self.w_bar, self.lam):
            r = r + (self.rho - 1.0) * torch.sum(p * lm) + 0.5 * self.alpha * torch.sum(torch.square(p - wb))
        return r

    def post_update(self):
        with torch.no_grad():
            for p, wb, lm in zip(self.params, self.w_bar, self.lam):
                lm.add_(-self.alpha * (p - wb))
                wb.mul_(1.0 - self.beta)
                wb.add_(self.beta * p - (self.beta / self.alpha) * lm)

    def finish(self, task_loss):
        """Everything after the task loss: regulariser, backward, clip, step, post-update."""
        (task_loss + self.regularizer()).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.post_update()

    def update_only(self):
        """The update given p.grad already holding the task gradient (for update-only
        benchmarks): what the authors' loop pays per update beyond the task gradient."""
        self.regularizer().backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.post_update()
