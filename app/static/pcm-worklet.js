// AudioWorklet module: runs on the audio rendering thread, turns each 128-sample block of the
// microphone (Float32, at the AudioContext's rate) into 16-bit PCM and posts it to the page, which
// batches the blocks into WebSocket frames. Nothing is played: the node's output stays silent.

class PcmS16Processor extends AudioWorkletProcessor {
  process(inputs) {
    const samples = inputs[0][0]; // the node is mono (channelCount 1); absent while nothing is connected
    if (samples) {
      const pcm = new Int16Array(samples.length);
      for (let i = 0; i < samples.length; i++) {
        const s = Math.max(-1, Math.min(1, samples[i]));
        pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
      }
      this.port.postMessage(pcm, [pcm.buffer]); // transferred, not copied
    }
    return true; // keep running until the page disconnects the node
  }
}

registerProcessor('pcm-s16le', PcmS16Processor);
