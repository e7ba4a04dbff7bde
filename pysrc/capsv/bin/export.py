"""Export a trained model for use without this package: TorchScript, and ONNX with --onnx.

    python -m capsv.bin.export --exp exp/mini_cap [--out DIR] [--onnx] [--fbank-config conf/fbank.conf]

Writes into --out (default <exp>/export): trunk.pt (fbank crops [K, T, 40] -> frames [K, T/4, C]),
score.pt (the frames of both utterances of a trial -> (score, emb_a, emb_b); the score is stage 3's
mean cosine over the crop pairs), for TAP/SAP also embed.pt (frames -> mean unit crop embedding);
with --onnx the same parts as .onnx; and export.json: the checkpoint epoch, the fbank options
(torchaudio.compliance.kaldi.fbank keyword arguments, from --fbank-config, the options stage 1
used), num_crops, crop_frames and the crop rule, each part's inputs and outputs, the files'
SHA-256. Uses the newest checkpoint in <exp>/models. Each exported file is loaded back and
checked against the model on inputs of another size than the export's example. The exported model
computes in fp32: one `WARNING:` line says so when the scores that set <exp>/calibration.json's
thresholds were computed at another precision (bf16 or fp16 on a GPU).
"""
import argparse


from capsv.export import export
from capsv.utils import run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment dir with a trained model (exp/<name>)")
    p.add_argument("--out", help="export dir (default <exp>/export)")
    p.add_argument("--onnx", action="store_true", help="also write ONNX files (needs onnx, onnxscript)")
    p.add_argument("--fbank-config", default="conf/fbank.conf",
                   help="the fbank options the features were made with (default conf/fbank.conf)")
    args = p.parse_args(argv)
    rec = export(args.exp, args.out, args.onnx, args.fbank_config)
    out = args.out or f"{args.exp.rstrip('/')}/export"
    print(f"exported {rec['pooling'].upper()} epoch {rec['epoch']} of {args.exp} -> {out}: "
          f"{' '.join(sorted(rec['sha256']))} export.json")


if __name__ == "__main__":
    run_main(main)
