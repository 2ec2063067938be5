"""Exponential moving average of the trainable weights, kept in fp32 and sharded like them."""

import torch


class EMA:
    """shadow <- weight * shadow + (1 - weight) * param after every optimizer step from
    `start_step` on; before it the shadow copies the weights."""

    def __init__(self, model, weight, start_step=0):
        self.weight, self.start_step = weight, start_step
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step):
        keep = self.weight if step >= self.start_step else 0.0
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - keep)

    def state_dict(self):
        return self.shadow
