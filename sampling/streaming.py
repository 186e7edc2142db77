"""Block streaming (transformer blocks, text encoder layers): the first blocks stay on the device, the others live
in (pinned) CPU memory and are copied in just before they run, the next one prefetched on a side CUDA stream while
the current one computes. Numerically identical to a resident run: the same weights meet the same kernels. On
another device (the CPU standing in for one in tests) the same code runs with plain copies."""

import torch


def streamable_blocks(model):
    """A model's blocks in the order they run (the ModuleLists its class names in `block_lists`)."""
    return [block for name in model.block_lists for block in getattr(model, name)]


class BlockStreamer:
    """Attach to a Flux2 or Qwen3 (`with BlockStreamer(model, "cuda", resident_blocks=4): ...`); detaching restores
    it."""

    def __init__(self, model, device, resident_blocks):
        self.model, self.device = model, torch.device(device)
        self.blocks = streamable_blocks(model)
        self.resident = max(0, min(resident_blocks, len(self.blocks)))
        self.streamed = self.blocks[self.resident:]
        self.hooks, self.host, self.events = [], {}, {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __enter__(self):
        streamed_ids = {id(b) for b in self.streamed}
        lists = {id(getattr(self.model, name)) for name in self.model.block_lists}
        for module in self.model.children():  # everything but the streamed blocks goes to the device
            if id(module) not in lists:
                module.to(self.device)
        for block in self.blocks:
            if id(block) not in streamed_ids:
                block.to(self.device)
        for index, block in enumerate(self.streamed):
            self.host[block] = {name: self.pin(t) for name, t in self.tensors(block)}
            self.hooks.append(block.register_forward_pre_hook(self.arrive))
            self.hooks.append(block.register_forward_hook(lambda module, args, out, i=index: self.leave(i)))
        if self.streamed:
            self.prefetch(0)
        return self.model

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        for block, tensors in self.host.items():
            self.place(block, tensors)
        self.hooks, self.host, self.events = [], {}, {}

    @staticmethod
    def tensors(block):
        return list(block.named_parameters()) + list(block.named_buffers())

    def pin(self, tensor):
        tensor = tensor.detach().cpu()
        return tensor.pin_memory() if self.stream is not None else tensor

    @staticmethod
    def place(block, tensors):
        for name, tensor in tensors.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            if attribute in owner._parameters:
                owner._parameters[attribute].data = tensor
            else:
                owner._buffers[attribute] = tensor

    def prefetch(self, index):
        """Start copying streamed block `index` to the device (on the side stream when there is one)."""
        block = self.streamed[index % len(self.streamed)]
        if block in self.events:
            return
        if self.stream is None:  # copy=True: a device copy even where the host is the device (the CPU stand-in)
            self.place(block, {n: t.to(self.device, copy=True) for n, t in self.host[block].items()})
            self.events[block] = None
            return
        with torch.cuda.stream(self.stream):
            self.place(block, {n: t.to(self.device, non_blocking=True) for n, t in self.host[block].items()})
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[block] = event

    def arrive(self, block, args):
        self.prefetch(self.streamed.index(block))  # no-op when already in flight
        event = self.events.get(block)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for _, tensor in self.tensors(block):  # made on the side stream, used here: keep them until this work ends
                tensor.record_stream(compute)

    def leave(self, index):
        block = self.streamed[index]
        self.place(block, self.host[block])  # drop the device copy (its memory returns to the cache)
        self.events.pop(block, None)
        self.prefetch(index + 1)  # the next streamed block, wrapping around to the first one for the next step
